"""Job events and checkpoints: appended by job processes, read by the API (newest first)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .db import Database
from .ids import new_id, now


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step: int
    path: str
    metrics: dict[str, Any]


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict | None = None,
        event_id: str | None = None,
        created_at: int | None = None,
    ) -> EventRecord:
        """Append an event. ``event_id`` and ``created_at`` come from a job's journal (``jobs/journal.py``),
        read again after a restart: an event already stored under that id is not added twice."""
        record = EventRecord(event_id or new_id("ftevent"), job_id, created_at or now(), level, message, type, data)
        self.db.execute(
            "INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, type, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.id, job_id, record.created_at, level, message, type, json.dumps(data) if data else None),
        )
        return record

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[EventRecord], bool]:
        rows, has_more = self.db.page(
            "events", order_col="seq", limit=limit, after=after, where=("job_id = ?",), params=(job_id,)
        )
        events = [
            EventRecord(
                r["id"],
                r["job_id"],
                r["created_at"],
                r["level"],
                r["message"],
                r["type"],
                json.loads(r["data"]) if r["data"] else None,
            )
            for r in rows
        ]
        return events, has_more

    def latest_data(self, job_id: str, key: str) -> dict[str, Any] | None:
        """The ``data`` of the job's newest event that has ``key`` (a batch's progress), else None."""
        row = self.db.query_one(
            "SELECT data FROM events WHERE job_id = ? AND json_extract(data, ?) IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (job_id, f"$.{key}"),
        )
        return json.loads(row["data"]) if row is not None else None

    def add_checkpoint(
        self,
        job_id: str,
        step: int,
        path: str,
        metrics: dict[str, Any],
        checkpoint_id: str | None = None,
        created_at: int | None = None,
    ) -> CheckpointRecord:
        record = CheckpointRecord(checkpoint_id or new_id("ftckpt"), job_id, created_at or now(), step, path, metrics)
        self.db.execute(
            "INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, path, metrics) VALUES (?, ?, ?, ?, ?, ?)",
            (record.id, job_id, record.created_at, step, path, json.dumps(metrics)),
        )
        return record

    def list_checkpoints(
        self, job_id: str, *, after: str | None = None, limit: int = 10
    ) -> tuple[list[CheckpointRecord], bool]:
        rows, has_more = self.db.page(
            "checkpoints", order_col="seq", limit=limit, after=after, where=("job_id = ?",), params=(job_id,)
        )
        records = [
            CheckpointRecord(r["id"], r["job_id"], r["created_at"], r["step"], r["path"], json.loads(r["metrics"]))
            for r in rows
        ]
        return records, has_more
