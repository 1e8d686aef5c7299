"""Stored chat completions (OpenAI's ``store: true``): the request's messages (and tools), the completion
as answered, and its metadata, to list, read, label and delete, and to evaluate later (``api/evals``)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import Database


@dataclass(frozen=True)
class StoredCompletion:
    id: str
    owner: str | None
    created_at: int
    model: str
    metadata: dict[str, str] | None
    request: dict[str, Any]  # {"messages": [...], "tools"?: [...]} as sent
    response: dict[str, Any]  # the chat.completion object

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredCompletion:
        metadata = json.loads(row["metadata"]) if row["metadata"] is not None else None
        return cls(
            row["id"],
            row["owner"],
            row["created_at"],
            row["model"],
            metadata,
            json.loads(row["request"]),
            json.loads(row["response"]),
        )


class ChatCompletionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, response: dict[str, Any], request: dict[str, Any], metadata: dict | None, owner: str | None) -> None:
        with self.db.transaction() as cur:
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM chat_completions").fetchone()[0]
            cur.execute(
                "INSERT INTO chat_completions (id, seq, owner, created_at, model, metadata, request, response) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    response["id"],
                    seq,
                    owner,
                    response["created"],
                    response["model"],
                    json.dumps(metadata) if metadata is not None else None,
                    json.dumps(request),
                    json.dumps(response),
                ),
            )

    def get(self, completion_id: str) -> StoredCompletion | None:
        row = self.db.query_one("SELECT * FROM chat_completions WHERE id = ?", (completion_id,))
        return StoredCompletion.from_row(row) if row is not None else None

    def list(
        self,
        *,
        owner: str | None,
        after: str | None = None,
        limit: int = 20,
        descending: bool = False,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        created_after: int | None = None,
        created_before: int | None = None,
    ) -> tuple[list[StoredCompletion], bool]:
        """One page; with ``model`` / ``metadata`` (every pair; ``{}``: none stored) / a creation window,
        only those that match."""
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where, params = [*where, "owner = ?"], [*params, owner]
        if model is not None:
            where, params = [*where, "model = ?"], [*params, model]
        if created_after is not None:
            where, params = [*where, "created_at >= ?"], [*params, created_after]
        if created_before is not None:
            where, params = [*where, "created_at <= ?"], [*params, created_before]
        if metadata == {}:  # those stored without metadata
            where = [*where, "metadata IS NULL"]
        for key, value in (metadata or {}).items():
            match = "EXISTS (SELECT 1 FROM json_each(chat_completions.metadata) WHERE key = ? AND value = ?)"
            where, params = [*where, match], [*params, key, value]
        rows, more = self.db.page(
            "chat_completions",
            order_col="seq",
            limit=limit,
            after=after,
            where=tuple(where),
            params=tuple(params),
            descending=descending,
        )
        return [StoredCompletion.from_row(r) for r in rows], more

    def update_metadata(self, completion_id: str, metadata: dict[str, str] | None) -> None:
        value = json.dumps(metadata) if metadata is not None else None
        self.db.execute("UPDATE chat_completions SET metadata = ? WHERE id = ?", (value, completion_id))

    def delete(self, completion_id: str) -> bool:
        return self.db.execute("DELETE FROM chat_completions WHERE id = ?", (completion_id,)) > 0

    def delete_before(self, created_at: int) -> int:
        """Delete the completions created before ``created_at`` (the retention sweep); how many."""
        return self.db.execute("DELETE FROM chat_completions WHERE created_at < ?", (created_at,))
