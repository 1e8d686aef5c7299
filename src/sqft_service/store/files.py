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
        )


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
    ) -> FileRecord:
        """Move a fully written staging file into place and record it (rename is atomic)."""
        file_id = file_id or new_id("file")
        dest = self.blob_path(file_id)
        os.replace(staged_path, dest)
        size = dest.stat().st_size
        self.db.execute(
            "INSERT INTO files (id, filename, bytes, sha256, purpose, created_at, status, path, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, 'processed', ?, ?)",
            (file_id, filename, size, sha256, purpose, now(), str(dest), json.dumps(meta or {})),
        )
        record = self.get(file_id)
        assert record is not None  # just inserted
        return record

    def get(self, file_id: str) -> FileRecord | None:
        row = self.db.query_one("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord.from_row(row) if row else None

    def resolve(self, ref: str) -> FileRecord | None:
        """A file by OpenAI id or, as the reference service does, by its uploaded filename (newest)."""
        record = self.get(ref)
        if record is not None:
            return record
        row = self.db.query_one(
            "SELECT * FROM files WHERE filename = ? ORDER BY created_at DESC, rowid DESC LIMIT 1", (ref,)
        )
        return FileRecord.from_row(row) if row else None

    def list(
        self, *, purpose: str | None = None, after: str | None = None, limit: int = 10000, order: str = "desc"
    ) -> tuple[list[FileRecord], bool]:
        where, params = (("purpose = ?",), (purpose,)) if purpose else ((), ())
        rows, has_more = self.db.page(
            "files", order_col="rowid", limit=limit, after=after, where=where, params=params,
            descending=order == "desc",
        )  # fmt: skip
        return [FileRecord.from_row(r) for r in rows], has_more

    def delete(self, file_id: str) -> bool:
        record = self.get(file_id)
        if record is None:
            return False
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        record.path.unlink(missing_ok=True)
        return True
