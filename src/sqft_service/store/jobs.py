"""Jobs of every kind (fine-tune, extract, merge, sparsify): one row each, the resolved spec stored with it."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..errors import QuotaExceededError
from .db import Database
from .ids import now

ACTIVE_STATUSES = ("validating_files", "queued", "running")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
FINE_TUNE = "fine_tune"
# Values of the `cancel_requested` column: why a running job's process is being stopped.
STOP_CANCEL = 1
STOP_PAUSE = 2


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    status: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    config: dict[str, Any]
    workspace: str
    pid: int | None
    stop_request: int
    model: str | None = None
    parent_job_id: str | None = None
    # Fine-tune fields (OpenAI's job object).
    training_file: str | None = None
    validation_file: str | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    seed: int | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    result_files: tuple[str, ...] = ()
    attempts: int = 0
    # The project (API key) that created it; None: created without authentication.
    owner: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def base_model(self) -> str:
        """What the job loads as its base: ``model``, or for a fine-tune of a fine-tuned (``ft:``) model the
        directory the service resolved that name to (``General.base_model``)."""
        model = self.model or ""
        if model.startswith("ft:"):
            return str(self.config.get("General", {}).get("base_model") or model)
        return model

    @property
    def cancel_requested(self) -> bool:
        return self.stop_request == STOP_CANCEL

    @property
    def pause_requested(self) -> bool:
        return self.stop_request == STOP_PAUSE

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        def js(key: str) -> Any:
            return json.loads(row[key]) if row[key] is not None else None

        return cls(
            id=row["id"],
            kind=row["kind"],
            status=row["status"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            error=js("error"),
            result=js("result"),
            config=js("config"),
            workspace=row["workspace"],
            pid=row["pid"],
            stop_request=int(row["cancel_requested"]),
            model=row["model"],
            parent_job_id=row["parent_job_id"],
            training_file=row["training_file"],
            validation_file=row["validation_file"],
            fine_tuned_model=row["fine_tuned_model"],
            trained_tokens=row["trained_tokens"],
            estimated_finish=row["estimated_finish"],
            seed=row["seed"],
            suffix=row["suffix"],
            metadata=js("metadata"),
            result_files=tuple(js("result_files") or ()),
            attempts=row["attempts"],
            owner=row["owner"],
        )


_JSON_FIELDS = {"error", "result", "metadata", "config", "result_files"}
_CREATE_FIELDS = (
    "model",
    "parent_job_id",
    "training_file",
    "validation_file",
    "seed",
    "suffix",
    "metadata",
    "owner",
)


def _encode(key: str, value: Any) -> Any:
    if key in _JSON_FIELDS and value is not None:
        return json.dumps(list(value) if key == "result_files" else value)
    return value


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        *,
        job_id: str,
        kind: str,
        config: dict[str, Any],
        workspace: str,
        status: str = "validating_files",
        max_unfinished: int | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Insert a job; ``fields`` are the optional columns (model, parent_job_id, training_file, ...).

        Raises:
            QuotaExceededError: with ``max_unfinished``, the job's owner already has that many jobs not yet
                ended. Counted inside the insert's write transaction, so concurrent creates cannot overshoot.
        """
        unknown = set(fields) - set(_CREATE_FIELDS)
        if unknown:
            raise TypeError(f"unknown job fields: {sorted(unknown)}")
        columns = ["id", "seq", "kind", "status", "created_at", "config", "workspace", *fields]
        with self.db.transaction() as cur:
            if max_unfinished is not None:
                statuses = (*ACTIVE_STATUSES, "paused")
                n = cur.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' for _ in statuses)}) AND owner IS ?",
                    (*statuses, fields.get("owner")),
                ).fetchone()[0]
                if n >= max_unfinished:
                    raise QuotaExceededError(
                        f"this project already has {max_unfinished} jobs that have not ended "
                        "(SQFT_MAX_UNFINISHED_JOBS); wait for some to finish or cancel them"
                    )
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            values = [job_id, seq, kind, status, now(), json.dumps(config), workspace]
            values += [_encode(k, v) for k, v in fields.items()]
            cur.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                values,
            )
        job = self.get(job_id)
        assert job is not None  # just inserted
        return job

    def get(self, job_id: str, kind: str | None = None) -> JobRecord | None:
        """The job ``job_id``; with ``kind``, only if it is of that kind (ids are one namespace)."""
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (kind is not None and row["kind"] != kind):
            return None
        return JobRecord.from_row(row)

    def list(
        self,
        *,
        kinds: tuple[str, ...],
        after: str | None = None,
        limit: int = 20,
        owner: str | None = None,
        metadata: dict[str, str] | None = None,
        config: dict[str, str] | None = None,
        statuses: tuple[str, ...] | None = None,
        descending: bool = True,
    ) -> tuple[list[JobRecord], bool]:
        """One page of jobs of these kinds; with ``owner``, only that project's; with ``metadata``, only
        jobs whose metadata has every one of those pairs (``{}``: jobs without metadata); with ``config``,
        only jobs whose config has those top-level string values; with ``statuses``, only jobs in them."""
        where: tuple[str, ...] = (f"kind IN ({','.join('?' for _ in kinds)})",)
        params: tuple[str, ...] = kinds
        if owner is not None:
            where, params = (*where, "owner = ?"), (*params, owner)
        for key, value in (config or {}).items():  # keys are the service's own (identifiers), never a client's
            where, params = (*where, f"json_extract(config, '$.{key}') = ?"), (*params, value)
        if statuses:
            where, params = (*where, f"status IN ({','.join('?' for _ in statuses)})"), (*params, *statuses)
        if metadata == {}:
            where = (*where, "(metadata IS NULL OR metadata IN ('null', '{}'))")
        for key, value in (metadata or {}).items():
            # json_each, not json_extract: a key may hold any character, and a JSON path can't quote all.
            match = "EXISTS (SELECT 1 FROM json_each(jobs.metadata) WHERE key = ? AND value = ? AND type = 'text')"
            where, params = (*where, match), (*params, key, value)
        rows, has_more = self.db.page(
            "jobs", order_col="seq", limit=limit, after=after, where=where, params=params, descending=descending
        )
        return [JobRecord.from_row(r) for r in rows], has_more

    def delete(self, job_id: str) -> bool:
        """Forget an ended job, its events and checkpoints (its workspace is the caller's to remove)."""
        with self.db.transaction() as cur:
            cur.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            cur.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))
            cur.execute(f"DELETE FROM jobs WHERE id = ? AND status IN ({','.join('?' for _ in FINAL_STATUSES)})",
                        (job_id, *FINAL_STATUSES))  # fmt: skip
            return cur.rowcount > 0

    def with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ",".join("?" for _ in statuses)
        rows = self.db.query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq ASC", statuses)
        return [JobRecord.from_row(r) for r in rows]

    def active_of_kind(self, kind: str) -> list[JobRecord]:
        marks = ",".join("?" for _ in ACTIVE_STATUSES)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE kind = ? AND status IN ({marks}) ORDER BY seq ASC", (kind, *ACTIVE_STATUSES)
        )
        return [JobRecord.from_row(r) for r in rows]

    def referencing_file(self, file_id: str) -> list[JobRecord]:
        """Jobs not yet ended (paused ones included) that will read the file ``file_id``."""
        statuses = (*ACTIVE_STATUSES, "paused")
        marks = ",".join("?" for _ in statuses)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE status IN ({marks}) AND (training_file = ? OR validation_file = ? "
            "OR json_extract(config, '$.calibration_file') = ? OR json_extract(config, '$.file') = ? "
            "OR json_extract(config, '$.input_file_id') = ?) ORDER BY seq ASC",
            (*statuses, file_id, file_id, file_id, file_id, file_id),
        )
        return [JobRecord.from_row(r) for r in rows]

    def update(self, job_id: str, *, only_if_status: tuple[str, ...] | None = None, **values: Any) -> bool:
        """Set columns; with ``only_if_status`` the write happens only from those states (no lost races)."""
        cols = ", ".join(f"{k} = ?" for k in values)
        params = [_encode(k, v) for k, v in values.items()]
        sql = f"UPDATE jobs SET {cols} WHERE id = ?"
        params.append(job_id)
        if only_if_status:
            sql += f" AND status IN ({','.join('?' for _ in only_if_status)})"
            params.extend(only_if_status)
        return self.db.execute(sql, params) > 0
