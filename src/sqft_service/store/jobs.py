"""Fine-tuning jobs: one row each, the resolved configuration stored with it."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import Database
from .ids import now

ACTIVE_STATUSES = ("validating_files", "queued", "running")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobRecord:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    status: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    estimated_finish: int | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    hyperparameters: dict[str, Any]
    config: dict[str, Any]
    result_files: list[str]
    output_dir: str
    pid: int | None
    cancel_requested: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        def js(key: str) -> Any:
            return json.loads(row[key]) if row[key] is not None else None

        return cls(
            id=row["id"],
            model=row["model"],
            training_file=row["training_file"],
            validation_file=row["validation_file"],
            status=row["status"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            error=js("error"),
            fine_tuned_model=row["fine_tuned_model"],
            trained_tokens=row["trained_tokens"],
            estimated_finish=row["estimated_finish"],
            seed=row["seed"],
            suffix=row["suffix"],
            metadata=js("metadata"),
            hyperparameters=js("hyperparameters"),
            config=js("config"),
            result_files=js("result_files") or [],
            output_dir=row["output_dir"],
            pid=row["pid"],
            cancel_requested=bool(row["cancel_requested"]),
        )


_JSON_FIELDS = {"error", "metadata", "hyperparameters", "config", "result_files"}


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        *,
        job_id: str,
        model: str,
        training_file: str,
        validation_file: str | None,
        seed: int,
        suffix: str | None,
        metadata: dict[str, str] | None,
        hyperparameters: dict[str, Any],
        config: dict[str, Any],
        output_dir: str,
        status: str = "validating_files",
    ) -> JobRecord:
        with self.db.transaction() as cur:
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            cur.execute(
                "INSERT INTO jobs (id, seq, model, training_file, validation_file, status, created_at, seed, "
                "suffix, metadata, hyperparameters, config, output_dir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    seq,
                    model,
                    training_file,
                    validation_file,
                    status,
                    now(),
                    seed,
                    suffix,
                    json.dumps(metadata) if metadata is not None else None,
                    json.dumps(hyperparameters),
                    json.dumps(config),
                    output_dir,
                ),
            )
        job = self.get(job_id)
        assert job is not None  # just inserted
        return job

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(row) if row else None

    def list(self, *, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        rows, has_more = self.db.page("jobs", order_col="seq", limit=limit, after=after)
        return [JobRecord.from_row(r) for r in rows], has_more

    def with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ",".join("?" for _ in statuses)
        rows = self.db.query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq ASC", statuses)
        return [JobRecord.from_row(r) for r in rows]

    def update(self, job_id: str, *, only_if_status: tuple[str, ...] | None = None, **values: Any) -> bool:
        """Set columns; with ``only_if_status`` the write happens only from those states (no lost races)."""
        cols = ", ".join(f"{k} = ?" for k in values)
        params = [json.dumps(v) if k in _JSON_FIELDS and v is not None else v for k, v in values.items()]
        sql = f"UPDATE jobs SET {cols} WHERE id = ?"
        params.append(job_id)
        if only_if_status:
            sql += f" AND status IN ({','.join('?' for _ in only_if_status)})"
            params.extend(only_if_status)
        return self.db.execute(sql, params) > 0
