"""Aggregates over the store for ``GET /metrics``, computed when asked: right after a restart too."""

from __future__ import annotations

import json
from typing import Any

from .db import Database


def jobs_by_kind_and_status(db: Database) -> dict[tuple[str, str], int]:
    rows = db.query("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status")
    return {(r["kind"], r["status"]): r["n"] for r in rows}


def failures_by_code(db: Database) -> dict[tuple[str, str], int]:
    """Failed jobs by kind and ``error.code`` (every failed job has one; ``unknown`` guards old rows)."""
    rows = db.query(
        "SELECT kind, COALESCE(json_extract(error, '$.code'), 'unknown') AS code, COUNT(*) AS n "
        "FROM jobs WHERE status = 'failed' GROUP BY kind, code"
    )
    return {(r["kind"], r["code"]): r["n"] for r in rows}


def running_jobs(db: Database) -> list[tuple[str, str]]:
    """(id, kind) of the jobs marked running."""
    return [(r["id"], r["kind"]) for r in db.query("SELECT id, kind FROM jobs WHERE status = 'running' ORDER BY seq")]


def latest_step_metrics(db: Database, job_id: str) -> dict[str, Any] | None:
    """The newest metrics event of a job that has a step's throughput (the job process writes one every
    ``logging_steps``; eval and NLS rows have none). Walks the job's events newest first on its index."""
    row = db.query_one(
        "SELECT data FROM events WHERE job_id = ? AND type = 'metrics' "
        "AND json_extract(data, '$.tokens_per_s') IS NOT NULL ORDER BY seq DESC LIMIT 1",
        (job_id,),
    )
    return json.loads(row["data"]) if row is not None else None
