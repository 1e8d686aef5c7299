"""Uploaded files: metadata in SQLite, bytes on disk under ``<data_dir>/files/<id>``.

Blobs are named by id, never by the user's filename, so no filename can escape the data dir.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import Database
from .ids import new_id, now


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    bytes: int
    sha256: str
    purpose: str
    created_at: int
    status: str
    status_details: str | None
    path: Path
    meta: dict[str, Any]
    # The project (API key) that uploaded it; None: uploaded without authentication.
    owner: str | None = None
    expires_at: int | None = None  # removed after this (unix seconds); None: kept until deleted

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        return cls(
            id=row["id"],
            filename=row["filename"],
            bytes=row["bytes"],
            sha256=row["sha256"],
            purpose=row["purpose"],
            created_at=row["created_at"],
            status=row["status"],
            status_details=row["status_details"],
            path=Path(row["path"]),
            meta=json.loads(row["meta"] or "{}"),
            owner=row["owner"],
            expires_at=row["expires_at"],
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, db: Database, files_dir: Path) -> None:
        self.db = db
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add(
        self,
        *,
        file_id: str | None = None,
        filename: str,
        purpose: str,
        staged_path: Path,
        sha256: str,
        meta: dict[str, Any] | None = None,
        owner: str | None = None,
        expires_after: int | None = None,
    ) -> FileRecord:
        """Move a fully written staging file into place and record it (rename is atomic); with
        ``expires_after`` (seconds), it expires that long after now."""
        file_id = file_id or new_id("file")
        dest = self.blob_path(file_id)
        _fsync(staged_path)  # the bytes reach the disk before the rename makes them the file
        os.replace(staged_path, dest)
        _fsync(self.files_dir)  # and the rename itself survives a power cut
        size = dest.stat().st_size
        created = now()
        expires_at = created + expires_after if expires_after is not None else None
        self.db.execute(
            "INSERT INTO files (id, filename, bytes, sha256, purpose, created_at, status, path, meta, owner, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, 'processed', ?, ?, ?, ?)",
            (file_id, filename, size, sha256, purpose, created, str(dest), json.dumps(meta or {}), owner, expires_at),
        )
        record = self.get(file_id)
        assert record is not None  # just inserted
        return record

    def count(self, owner: str | None) -> int:
        row = self.db.query_one("SELECT COUNT(*) AS n FROM files WHERE owner IS ?", (owner,))
        return int(row["n"]) if row else 0

    def get(self, file_id: str) -> FileRecord | None:
        row = self.db.query_one("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord.from_row(row) if row else None

    def resolve(self, ref: str, owner: str | None = None) -> FileRecord | None:
        """A file by OpenAI id or, as the reference service does, by its uploaded filename (newest).

        With ``owner``, only that project's files: a filename never resolves to another project's file.
        """
        record = self.get(ref)
        if record is not None and (owner is None or record.owner == owner):
            return record
        mine, args = ("AND owner = ? ", (ref, owner)) if owner is not None else ("", (ref,))
        row = self.db.query_one(
            f"SELECT * FROM files WHERE filename = ? {mine}ORDER BY created_at DESC, rowid DESC LIMIT 1", args
        )
        return FileRecord.from_row(row) if row else None

    def list(
        self,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
        owner: str | None = None,
    ) -> tuple[list[FileRecord], bool]:
        """One page of files; with ``owner``, only that project's."""
        clauses = [("purpose = ?", purpose)] if purpose else []
        clauses += [("owner = ?", owner)] if owner is not None else []
        where, params = tuple(c for c, _ in clauses), tuple(v for _, v in clauses)
        rows, has_more = self.db.page(
            "files", order_col="rowid", limit=limit, after=after, where=where, params=params,
            descending=order == "desc",
        )  # fmt: skip
        return [FileRecord.from_row(r) for r in rows], has_more

    def expired(self, at: int) -> list[str]:
        """The ids of files whose ``expires_at`` is ``at`` or earlier."""
        rows = self.db.query("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (at,))
        return [r["id"] for r in rows]

    def delete(self, file_id: str) -> bool:
        record = self.get(file_id)
        if record is None:
            return False
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        record.path.unlink(missing_ok=True)
        return True
