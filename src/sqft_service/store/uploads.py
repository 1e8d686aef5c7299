"""Uploads in parts: rows in SQLite, each part's bytes under ``<data_dir>/uploads/<upload id>/<part id>``.

An upload is ``pending`` while parts arrive, ``completing`` while its parts are joined into a file
(shown to clients as ``pending``; a second completion or a late part is refused meanwhile), and then
``completed``, ``cancelled`` or ``expired``: in those three its parts are gone from the disk. A service
that stops during a completion finds the upload ``pending`` again at its next start (:meth:`recover`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import Database
from .ids import new_id, now

ENDED = ("completed", "cancelled", "expired")


@dataclass(frozen=True)
class UploadRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    status: str
    created_at: int
    expires_at: int
    file_id: str | None
    owner: str | None
    file_expires_after: int | None  # seconds: the file it makes expires that long after its creation

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> UploadRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PartRecord:
    id: str
    upload_id: str
    bytes: int
    created_at: int
    path: Path


class UploadStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def parts_dir(self, upload_id: str) -> Path:
        return self.root / upload_id

    def create(
        self,
        *,
        filename: str,
        purpose: str,
        size: int,
        mime_type: str,
        expires_at: int,
        owner: str | None,
        file_expires_after: int | None = None,
    ) -> UploadRecord:
        upload_id = new_id("upload", "_")
        self.parts_dir(upload_id).mkdir(parents=True)
        self.db.execute(
            "INSERT INTO uploads (id, filename, purpose, bytes, mime_type, status, created_at, expires_at, owner, "
            "file_expires_after) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (upload_id, filename, purpose, size, mime_type, now(), expires_at, owner, file_expires_after),
        )
        record = self.get(upload_id)
        assert record is not None  # just inserted
        return record

    def get(self, upload_id: str) -> UploadRecord | None:
        row = self.db.query_one("SELECT * FROM uploads WHERE id = ?", (upload_id,))
        return UploadRecord.from_row(row) if row else None

    def count_open(self, owner: str | None) -> int:
        row = self.db.query_one(
            "SELECT COUNT(*) AS n FROM uploads WHERE status IN ('pending', 'completing') AND owner IS ?", (owner,)
        )
        return int(row["n"]) if row else 0

    def received(self, upload_id: str) -> tuple[int, int]:
        """How many parts the upload holds and their bytes together."""
        row = self.db.query_one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM upload_parts WHERE upload_id = ?", (upload_id,)
        )
        return (int(row["n"]), int(row["b"])) if row else (0, 0)

    def add_part(self, upload_id: str, staged: Path, size: int, max_parts: int) -> PartRecord | str:
        """Keep ``staged`` (a file in :attr:`root`) as the upload's next part, or say why not.

        The checks and the insert are one transaction, so parts sent at once can't overrun the
        upload's ``bytes`` together. Returns the part, or the reason it was refused (``staged`` is then
        left to the caller).
        """
        part_id = new_id("part", "_")
        with self.db.transaction() as cur:
            row = cur.execute("SELECT status, bytes FROM uploads WHERE id = ?", (upload_id,)).fetchone()
            if row is None or row["status"] != "pending":
                return "it is no longer pending" if row is not None else "it was not found"
            n, held = cur.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM upload_parts WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if n >= max_parts:
                return f"it already holds {n} parts, the most one upload may have"
            if held + size > row["bytes"]:
                return (
                    f"its parts would then hold {held + size} bytes, more than the {row['bytes']} it was "
                    "created for (`bytes`)"
                )
            created = now()
            cur.execute(
                "INSERT INTO upload_parts (id, upload_id, bytes, created_at) VALUES (?, ?, ?, ?)",
                (part_id, upload_id, size, created),
            )
            path = self.parts_dir(upload_id) / part_id
            os.replace(staged, path)  # inside the transaction: a failed rename rolls the row back
        return PartRecord(part_id, upload_id, size, created, path)

    def parts(self, upload_id: str) -> dict[str, PartRecord]:
        rows = self.db.query("SELECT * FROM upload_parts WHERE upload_id = ? ORDER BY created_at, rowid", (upload_id,))
        folder = self.parts_dir(upload_id)
        return {r["id"]: PartRecord(r["id"], upload_id, r["bytes"], r["created_at"], folder / r["id"]) for r in rows}

    def move(self, upload_id: str, source: str, target: str) -> bool:
        """Move the upload from status ``source`` to ``target``; False when it was not in ``source``."""
        sql = "UPDATE uploads SET status = ? WHERE id = ? AND status = ?"
        return self.db.execute(sql, (target, upload_id, source)) == 1

    def end(self, upload_id: str, status: str, source: str, file_id: str | None = None) -> bool:
        """Move the upload from ``source`` to an ended ``status`` and drop its parts; False when it was
        not in ``source``."""
        assert status in ENDED
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE uploads SET status = ?, file_id = ? WHERE id = ? AND status = ?",
                (status, file_id, upload_id, source),
            )
            if cur.rowcount != 1:
                return False
            cur.execute("DELETE FROM upload_parts WHERE upload_id = ?", (upload_id,))
        shutil.rmtree(self.parts_dir(upload_id), ignore_errors=True)
        return True

    def expire(self, at: int) -> int:
        """End every pending upload whose time ran out by ``at``; how many."""
        rows = self.db.query("SELECT id FROM uploads WHERE status = 'pending' AND expires_at <= ?", (at,))
        return sum(self.end(r["id"], "expired", "pending") for r in rows)

    def recover(self) -> None:
        """At start: an upload left ``completing`` by a stopped service is ``pending`` again (its file was
        not recorded, or was recorded and the upload not: a repeated completion then makes a second
        file, never a lost one); parts dirs of no open upload, and parts cut off mid-way, are removed."""
        self.db.execute("UPDATE uploads SET status = 'pending' WHERE status = 'completing'")
        open_ids = {r["id"] for r in self.db.query("SELECT id FROM uploads WHERE status = 'pending'")}
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in open_ids:
                shutil.rmtree(entry, ignore_errors=True)
            elif not entry.is_dir():
                entry.unlink(missing_ok=True)
