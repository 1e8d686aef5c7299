"""A job's journal: events, checkpoints and progress as JSON lines in its workspace, for jobs that must
not write the service's SQLite store themselves.

A Ray job may run on another node. The data dir is shared between nodes, but SQLite's WAL mode needs
shared memory between every process that opens the database, which a network file system does not
give. So a Ray job appends to ``jobs/<id>/journal.jsonl`` (one writer, appends only, each record
opened, written and closed: close-to-open consistency makes it visible to the service's node), and the
job manager, the store's only writer on its node, ingests what is new at every poll.

Each record carries the id and time it was made with, and the store inserts an id once
(``INSERT OR IGNORE``), so reading a journal again from the start (after a restart, or a relaunch of
the job) adds nothing twice. Progress is last-wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..store.events import EventStore
from ..store.ids import new_id, now
from ..store.jobs import JobStore

log = logging.getLogger(__name__)

# The job columns a journal may set (the rest of the row belongs to the manager).
PROGRESS_FIELDS = ("trained_tokens", "estimated_finish")


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")


class JournalEvents:
    """Stands in for :class:`EventStore` in the job process (``worker.StoreSink``), writing the journal."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        record = {"record": "event", "id": new_id("ftevent"), "created_at": now(), "level": level, "type": type}
        _append(self.path, {**record, "message": message, "data": data})

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, Any]) -> None:
        record = {"record": "checkpoint", "id": new_id("ftckpt"), "created_at": now(), "step": step}
        _append(self.path, {**record, "path": path, "metrics": metrics})


class JournalJobs:
    """Stands in for :class:`JobStore` in the job process: only progress fields."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def update(self, job_id: str, **fields: Any) -> None:
        _append(self.path, {"record": "progress", **{k: v for k, v in fields.items() if k in PROGRESS_FIELDS}})


def ingest(path: Path, offset: int, job_id: str, events: EventStore, jobs: JobStore) -> int:
    """Store the complete records of ``path`` from byte ``offset`` on; return the offset to read from next.

    A line being written (no newline yet) waits for the next call; a line that does not parse is logged
    and skipped (a journal is written by our own job process, so that is a bug, not a user error).
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return offset
    end = chunk.rfind(b"\n") + 1
    progress: dict[str, Any] = {}
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
            kind = record["record"]
            if kind == "event":
                events.add_event(
                    job_id,
                    record["message"],
                    level=record["level"],
                    type=record["type"],
                    data=record.get("data"),
                    event_id=record["id"],
                    created_at=record["created_at"],
                )
            elif kind == "checkpoint":
                events.add_checkpoint(
                    job_id,
                    record["step"],
                    record["path"],
                    record["metrics"],
                    checkpoint_id=record["id"],
                    created_at=record["created_at"],
                )
            elif kind == "progress":
                progress.update({k: record[k] for k in PROGRESS_FIELDS if k in record})
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("job %s: skipped a journal line that does not parse: %s", job_id, exc, extra={"job_id": job_id})
    if progress:
        jobs.update(job_id, **progress)
    return offset + end
