"""Uploads in parts (OpenAI's Uploads API): a file too big for one request, or sent over a link that
drops, arrives as parts of up to 64 MiB, is joined in the order the client lists, and becomes a file
through the same checks as ``POST /v1/files`` (:meth:`FileService.accept`).

What a failed completion leaves: the upload stays ``pending`` with all its parts, so a client whose
checksum or part list was wrong, or whose training file failed its check, can complete it again (or
cancel it); nothing is half-made. Pending uploads end an hour after their creation, as OpenAI's do.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ...errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError, QuotaExceededError
from ...store.files import FileRecord
from ...store.ids import now
from ...store.uploads import PartRecord, UploadRecord, UploadStore
from ..files.protocol import UPLOAD_PURPOSES
from ..files.service import CHUNK, FileService, safe_filename
from ..owner import current_owner, owned_by_caller
from .protocol import MAX_UPLOAD_PARTS, CreateUploadRequest

UPLOAD_TTL_S = 3600
# OpenAI's part limit, and the SDK's default part size (`upload_file_chunked`).
MAX_PART_BYTES = 64 * 1024 * 1024
# Pending uploads one project may hold at once: each may keep up to the file limit on the disk.
MAX_OPEN_UPLOADS = 16


class UploadService:
    def __init__(self, store: UploadStore, files: FileService) -> None:
        self.store = store
        self.files = files

    def create(self, req: CreateUploadRequest) -> UploadRecord:
        if req.purpose not in UPLOAD_PURPOSES:
            raise InvalidRequestError(
                f"'{req.purpose}' is not a valid purpose; expected one of {', '.join(UPLOAD_PURPOSES)}",
                param="purpose",
            )
        try:
            filename = safe_filename(req.filename)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, param="filename") from None
        if req.bytes > self.files.max_upload_bytes:
            raise PayloadTooLargeError(
                f"`bytes` is {req.bytes}, over the file limit of {self.files.max_upload_bytes} bytes",
                param="bytes",
                code="file_too_large",
            )
        self.store.expire(now())
        if self.store.count_open(current_owner()) >= MAX_OPEN_UPLOADS:
            raise QuotaExceededError(
                f"this project already has {MAX_OPEN_UPLOADS} pending uploads; complete or cancel some first",
                param="filename",
            )
        return self.store.create(
            filename=filename,
            purpose=req.purpose,
            size=req.bytes,
            mime_type=req.mime_type,
            expires_at=now() + UPLOAD_TTL_S,
            owner=current_owner(),
            file_expires_after=req.expires_after.seconds if req.expires_after else None,
        )

    def get(self, upload_id: str) -> UploadRecord:
        """The caller's upload (404 otherwise), expired first if its hour is over."""
        record = self.store.get(upload_id)
        if record is None or not owned_by_caller(record.owner):
            raise NotFoundError(f"No such Upload object: {upload_id}", param="upload_id")
        if record.status == "pending" and record.expires_at <= now():
            self.store.end(upload_id, "expired", "pending")
            record = self.store.get(upload_id)
            assert record is not None
        return record

    def pending(self, upload_id: str) -> UploadRecord:
        """The caller's upload while it takes parts and completion; 409 once it has ended."""
        record = self.get(upload_id)
        if record.status == "completing":
            raise ConflictError(f"Upload {upload_id} is being completed", param="upload_id", code="upload_completing")
        if record.status != "pending":
            raise ConflictError(
                f"Upload {upload_id} is {record.status}: it takes no more parts or completion",
                param="upload_id",
                code=f"upload_{record.status}",
            )
        return record

    def part_limit(self, record: UploadRecord) -> int:
        """The most bytes the next part may have: 64 MiB, and no more than the upload still lacks."""
        _, held = self.store.received(record.id)
        return max(0, min(MAX_PART_BYTES, record.bytes - held))

    @property
    def staging_dir(self) -> Path:
        return self.store.root

    def add_part(self, upload_id: str, staged: Path, size: int) -> PartRecord:
        """Keep a received part (``staged`` in :attr:`staging_dir`; removed if refused)."""
        try:
            self.pending(upload_id)
            if size == 0:
                raise InvalidRequestError("the part is empty", param="data")
            kept = self.store.add_part(upload_id, staged, size, MAX_UPLOAD_PARTS)
            if isinstance(kept, str):
                raise ConflictError(f"Upload {upload_id} takes no more parts: {kept}", param="data")
            return kept
        finally:
            staged.unlink(missing_ok=True)  # moved into place, or refused

    def complete(self, upload_id: str, part_ids: list[str], md5: str | None) -> tuple[UploadRecord, FileRecord]:
        """Join the listed parts, in that order, into a file; the upload's parts not listed are dropped."""
        record = self.pending(upload_id)
        parts = self.store.parts(upload_id)
        listed = _listed_parts(parts, part_ids)
        total = sum(p.bytes for p in listed)
        if total != record.bytes:
            raise InvalidRequestError(
                f"the listed parts hold {total} bytes; the upload was created for {record.bytes} (`bytes`)",
                param="part_ids",
            )
        if not self.store.move(upload_id, "pending", "completing"):
            raise ConflictError(f"Upload {upload_id} is being completed or has ended", param="upload_id")
        try:
            staged, sha256, got_md5 = self._join(listed)
            if md5 is not None and md5.lower() != got_md5:
                staged.unlink(missing_ok=True)
                raise InvalidRequestError(
                    f"the joined parts have MD5 {got_md5}, not the {md5} given: check the parts and their order",
                    param="md5",
                )
            file = self.files.accept(
                staged,
                filename=record.filename,
                purpose=record.purpose,
                sha256=sha256,
                expires_after=record.file_expires_after,
            )
        except BaseException:
            self.store.move(upload_id, "completing", "pending")  # every part kept: complete it again
            raise
        self.store.end(upload_id, "completed", "completing", file_id=file.id)
        ended = self.store.get(upload_id)
        assert ended is not None
        return ended, file

    def cancel(self, upload_id: str) -> UploadRecord:
        """Drop a pending upload and its parts; cancelling a cancelled upload answers it again."""
        record = self.get(upload_id)
        if record.status == "cancelled":
            return record
        self.pending(upload_id)
        if not self.store.end(upload_id, "cancelled", "pending"):
            raise ConflictError(f"Upload {upload_id} is being completed or has ended", param="upload_id")
        ended = self.store.get(upload_id)
        assert ended is not None
        return ended

    def _join(self, parts: list[PartRecord]) -> tuple[Path, str, str]:
        """The parts written end to end into a staging file beside the files, and its SHA-256 and MD5."""
        fd, name = tempfile.mkstemp(dir=self.files.store.files_dir, prefix=".staging-")
        sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.path.open("rb") as src:
                        while chunk := src.read(CHUNK):
                            sha256.update(chunk)
                            md5.update(chunk)
                            out.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), sha256.hexdigest(), md5.hexdigest()


def _listed_parts(parts: dict[str, PartRecord], part_ids: list[str]) -> list[PartRecord]:
    seen: set[str] = set()
    listed = []
    for i, part_id in enumerate(part_ids):
        if part_id in seen:
            raise InvalidRequestError(f"part_ids[{i}]: '{part_id[:64]}' is listed twice", param="part_ids")
        if part_id not in parts:
            raise InvalidRequestError(f"part_ids[{i}]: '{part_id[:64]}' is not a part of this upload", param="part_ids")
        seen.add(part_id)
        listed.append(parts[part_id])
    return listed
