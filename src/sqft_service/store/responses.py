"""Stored responses (the Responses API's ``store``): the response object as answered, its own input
items (ids given when it was created), and its conversation: the turns it answered (earlier responses'
included, its ``instructions`` not) with its own answer last, which a response naming it as
``previous_response_id`` continues; a background response's stream events once it has ended."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .db import Database


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str | None
    created_at: int
    body: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, str]]
    events: list[dict[str, Any]] | None  # a background response's, once it has ended (None: none kept)


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(
        self,
        body: dict[str, Any],
        input_items: list[dict[str, Any]],
        conversation: list[dict[str, str]],
        owner: str | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO responses (id, owner, created_at, status, body, input_items, conversation) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                body["id"],
                owner,
                body["created_at"],
                body["status"],
                json.dumps(body),
                json.dumps(input_items),
                json.dumps(conversation),
            ),
        )

    def get(self, response_id: str) -> StoredResponse | None:
        row = self.db.query_one("SELECT * FROM responses WHERE id = ?", (response_id,))
        if row is None:
            return None
        items, conversation = json.loads(row["input_items"]), json.loads(row["conversation"])
        events = json.loads(row["events"]) if row["events"] else None
        body = json.loads(row["body"])
        return StoredResponse(row["id"], row["owner"], row["created_at"], body, items, conversation, events)

    def update(
        self,
        response_id: str,
        body: dict[str, Any],
        conversation: list[dict[str, Any]] | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Replace a stored response's body (a background response as it moves on) and, when given, its
        conversation and its events; False when it is no longer stored (deleted meanwhile)."""
        sets, values = ["status = ?", "body = ?"], [body["status"], json.dumps(body)]
        for column, value in (("conversation", conversation), ("events", events)):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(json.dumps(value))
        return self.db.execute(f"UPDATE responses SET {', '.join(sets)} WHERE id = ?", (*values, response_id)) > 0

    def fail_unfinished(self, message: str) -> int:
        """Mark ``failed`` the background responses a stopped service left queued or in progress; how many."""
        error = json.dumps({"code": "server_error", "message": message})
        return self.db.execute(
            "UPDATE responses SET status = 'failed', body = json_set(body, '$.status', 'failed', '$.error', json(?)) "
            "WHERE status IN ('queued', 'in_progress')",
            (error,),
        )

    def delete(self, response_id: str) -> bool:
        return self.db.execute("DELETE FROM responses WHERE id = ?", (response_id,)) > 0

    def delete_before(self, created_at: int) -> int:
        """Delete the responses created before ``created_at`` (the retention sweep); how many."""
        return self.db.execute("DELETE FROM responses WHERE created_at < ?", (created_at,))
