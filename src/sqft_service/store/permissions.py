"""Fine-tuned models shared with other projects (OpenAI's checkpoint permissions): one row per model and
project, kept until the owner revokes it or deletes the model."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from .db import Database
from .ids import new_id, now


@dataclass(frozen=True)
class PermissionRecord:
    id: str
    model: str
    job_id: str
    project_id: str
    created_at: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> PermissionRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


class PermissionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def grant(self, model: str, job_id: str, projects: list[str]) -> list[PermissionRecord]:
        """The permissions of ``model`` for ``projects``, made where missing (granting twice is a no-op)."""
        with self.db.transaction() as cur:
            for project in projects:
                cur.execute(
                    "INSERT OR IGNORE INTO model_permissions (id, model, job_id, project_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (new_id("cp", "_"), model, job_id, project, now()),
                )
        marks = ",".join("?" * len(projects))
        rows = self.db.query(
            f"SELECT * FROM model_permissions WHERE model = ? AND project_id IN ({marks})", (model, *projects)
        )
        by_project = {row["project_id"]: PermissionRecord.from_row(row) for row in rows}
        return [by_project[p] for p in projects]

    def of_model(self, model: str) -> list[PermissionRecord]:
        rows = self.db.query("SELECT * FROM model_permissions WHERE model = ? ORDER BY created_at, id", (model,))
        return [PermissionRecord.from_row(r) for r in rows]

    def of_project(self, project: str) -> list[PermissionRecord]:
        rows = self.db.query("SELECT * FROM model_permissions WHERE project_id = ? ORDER BY created_at", (project,))
        return [PermissionRecord.from_row(r) for r in rows]

    def allows(self, model: str, project: str | None) -> bool:
        if project is None:
            return False
        row = self.db.query_one("SELECT 1 FROM model_permissions WHERE model = ? AND project_id = ?", (model, project))
        return row is not None

    def revoke(self, permission_id: str, model: str) -> bool:
        return self.db.execute("DELETE FROM model_permissions WHERE id = ? AND model = ?", (permission_id, model)) > 0

    def forget_model(self, model: str) -> None:
        self.db.execute("DELETE FROM model_permissions WHERE model = ?", (model,))
