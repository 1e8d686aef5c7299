"""Stored responses (the Responses API's ``store``): the response object as answered, its own input
items (ids given when it was created), and its conversation: the turns it answered (earlier responses'
included, its ``instructions`` not) with its own answer last, which a response naming it as
``previous_response_id`` continues."""

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
            "INSERT INTO responses (id, owner, created_at, body, input_items, conversation) VALUES (?, ?, ?, ?, ?, ?)",
            (
                body["id"],
                owner,
                body["created_at"],
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
        return StoredResponse(row["id"], row["owner"], row["created_at"], json.loads(row["body"]), items, conversation)

    def delete(self, response_id: str) -> bool:
        return self.db.execute("DELETE FROM responses WHERE id = ?", (response_id,)) > 0

    def delete_before(self, created_at: int) -> int:
        """Delete the responses created before ``created_at`` (the retention sweep); how many."""
        return self.db.execute("DELETE FROM responses WHERE created_at < ?", (created_at,))
