"""Upload, list, fetch and delete files. Uploads stream to a staging file (hashing as they go), are
checked, then moved into place atomically: a rejected upload leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ...errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError, QuotaExceededError
from ...store.files import FileRecord, FileStore
from ...training.records import DataValidationError, inspect_training_file
from ..owner import current_owner, owned_by_caller
from .protocol import UPLOAD_PURPOSES

CHUNK = 1 << 20


def safe_filename(name: str | None) -> str:
    """The last path component of a client's filename, never ``..`` or empty.

    The name is only a label (blobs are stored by id), but it is shown back and used as a lookup
    key, so strip directories the way browsers do.
    """
    base = (name or "").replace("\\", "/").split("/")[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable())
    if base in ("", ".", ".."):
        raise InvalidRequestError("the uploaded file has no usable filename", param="file")
    return base[:255]


class FileService:
    def __init__(
        self,
        store: FileStore,
        max_upload_bytes: int,
        in_use: Callable[[str], list[str]] | None = None,
        max_files: int | None = None,
    ) -> None:
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        # The ids of jobs that will still read a file: such a file can't be deleted under them.
        self.in_use = in_use
        self.max_files = max_files

    def upload(self, stream: BinaryIO, filename: str | None, purpose: str) -> FileRecord:
        """Store a file read from ``stream`` (the HTTP route streams its body through :meth:`accept`)."""
        fd, staged_name = tempfile.mkstemp(dir=self.store.files_dir, prefix=".staging-")
        staged = Path(staged_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise PayloadTooLargeError(
                            f"file is larger than the limit of {self.max_upload_bytes} bytes", param="file"
                        )
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return self.accept(staged, filename=filename, purpose=purpose, sha256=digest.hexdigest())

    def accept(
        self, staged: Path, *, filename: str | None, purpose: str, sha256: str, expires_after: int | None = None
    ) -> FileRecord:
        """Check a fully received staging file (in ``files_dir``) and keep it; it is gone either way.
        ``expires_after``: seconds after which the job manager deletes it (``jobs/manager.py``)."""
        try:
            if self.max_files is not None and self.store.count(current_owner()) >= self.max_files:
                raise QuotaExceededError(
                    f"this project already stores {self.max_files} files (SQFT_MAX_FILES); delete some first",
                    param="file",
                )
            if purpose not in UPLOAD_PURPOSES:
                raise InvalidRequestError(
                    f"'{purpose}' is not a valid purpose; expected one of {', '.join(UPLOAD_PURPOSES)}",
                    param="purpose",
                )
            name = safe_filename(filename)
            meta = {}
            if purpose == "fine-tune":
                try:
                    stats = inspect_training_file(staged)
                except DataValidationError as exc:
                    # The same error, told about the upload (its field is `file`, not a job's `training_file`).
                    raise DataValidationError(
                        f"invalid training file '{name}': {exc.message}", param="file", code="invalid_file"
                    ) from exc
                meta = {"format": stats.format, "n_records": stats.n_records, "n_images": stats.n_images}
                if stats.max_images:
                    meta["max_images"] = stats.max_images
            return self.store.add(
                filename=name,
                purpose=purpose,
                staged_path=staged,
                sha256=sha256,
                meta=meta,
                owner=current_owner(),
                expires_after=expires_after,
            )
        finally:
            staged.unlink(missing_ok=True)

    def get(self, file_id: str) -> FileRecord:
        record = self.store.get(file_id)
        # Another project's file is a 404 like a missing one: a 403 would confirm that the id exists.
        if record is None or not owned_by_caller(record.owner):
            raise NotFoundError(f"No such File object: {file_id}", param="file_id")
        return record

    def resolve(self, ref: str, param: str) -> FileRecord:
        """A file by id or filename (the reference service names training files by filename)."""
        record = self.store.resolve(ref, owner=current_owner())
        if record is None:
            raise NotFoundError(f"No such File object: {ref}", param=param)
        return record

    def list(self, *, purpose: str | None, after: str | None, limit: int, order: str) -> tuple[list[FileRecord], bool]:
        return self.store.list(purpose=purpose, after=after, limit=limit, order=order, owner=current_owner())

    def delete(self, file_id: str) -> None:
        self.get(file_id)  # the caller's own file, or 404
        users = self.in_use(file_id) if self.in_use is not None else []
        if users:
            raise ConflictError(
                f"File {file_id} is used by {len(users)} job(s) not yet ended ({', '.join(users[:5])}); "
                "delete it once they have finished or been cancelled",
                param="file_id",
                code="file_in_use",
            )
        if not self.store.delete(file_id):
            raise NotFoundError(f"No such File object: {file_id}", param="file_id")
