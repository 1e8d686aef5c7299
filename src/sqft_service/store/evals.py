"""Evals (OpenAI's Evals API): a row each, the item schema and graders as given (names filled in)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import Database
from .ids import now


@dataclass(frozen=True)
class EvalRecord:
    id: str
    owner: str | None
    name: str
    created_at: int
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    metadata: dict[str, str] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EvalRecord:
        metadata = json.loads(row["metadata"]) if row["metadata"] is not None else None
        return cls(
            row["id"],
            row["owner"],
            row["name"],
            row["created_at"],
            json.loads(row["data_source_config"]),
            json.loads(row["testing_criteria"]),
            metadata,
        )


class EvalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        eval_id: str,
        name: str,
        data_source_config: dict[str, Any],
        testing_criteria: list[dict[str, Any]],
        metadata: dict[str, str] | None,
        owner: str | None,
    ) -> EvalRecord:
        with self.db.transaction() as cur:
            seq = cur.execute("SELECT COALESCE(MAX(MAX(seq), MAX(updated_seq)), 0) + 1 FROM evals").fetchone()[0]
            cur.execute(
                "INSERT INTO evals (id, seq, updated_seq, owner, name, created_at, data_source_config, "
                "testing_criteria, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    eval_id,
                    seq,
                    seq,
                    owner,
                    name,
                    now(),
                    json.dumps(data_source_config),
                    json.dumps(testing_criteria),
                    json.dumps(metadata) if metadata is not None else None,
                ),
            )
        record = self.get(eval_id)
        assert record is not None  # just inserted
        return record

    def get(self, eval_id: str) -> EvalRecord | None:
        row = self.db.query_one("SELECT * FROM evals WHERE id = ?", (eval_id,))
        return EvalRecord.from_row(row) if row is not None else None

    def list(
        self, *, owner: str | None, after: str | None, limit: int, descending: bool, by_update: bool
    ) -> tuple[list[EvalRecord], bool]:
        where, params = (("owner = ?",), (owner,)) if owner is not None else ((), ())
        order = "updated_seq" if by_update else "seq"
        rows, more = self.db.page(
            "evals", order_col=order, limit=limit, after=after, where=where, params=params, descending=descending
        )
        return [EvalRecord.from_row(r) for r in rows], more

    def update(self, eval_id: str, *, name: str | None, metadata: dict[str, str] | None) -> None:
        with self.db.transaction() as cur:
            seq = cur.execute("SELECT COALESCE(MAX(MAX(seq), MAX(updated_seq)), 0) + 1 FROM evals").fetchone()[0]
            sets, values = ["updated_seq = ?"], [seq]
            if name is not None:
                sets, values = [*sets, "name = ?"], [*values, name]
            if metadata is not None:
                sets, values = [*sets, "metadata = ?"], [*values, json.dumps(metadata)]
            cur.execute(f"UPDATE evals SET {', '.join(sets)} WHERE id = ?", (*values, eval_id))

    def delete(self, eval_id: str) -> bool:
        return self.db.execute("DELETE FROM evals WHERE id = ?", (eval_id,)) > 0
