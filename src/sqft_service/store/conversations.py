"""Conversations (OpenAI's Conversations API): a conversation's metadata, and its items (messages, calls,
calls' outputs, each as the API lists it) in the order they were added. Responses made in a
conversation read its items as their history and add their own input and output (``api/responses``)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import Database


@dataclass(frozen=True)
class StoredConversation:
    id: str
    owner: str | None
    created_at: int
    metadata: dict[str, str]


class DuplicateItemError(Exception):
    """An item's id is already the conversation's."""

    def __init__(self, item_id: str) -> None:
        super().__init__(item_id)
        self.item_id = item_id


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, conversation: StoredConversation, items: list[dict[str, Any]]) -> None:
        """Store a conversation with its first ``items``. Raises DuplicateItemError (nothing stored)."""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)",
                (conversation.id, conversation.owner, conversation.created_at, json.dumps(conversation.metadata)),
            )
            _insert(cur, conversation.id, items)

    def get(self, conversation_id: str) -> StoredConversation | None:
        row = self.db.query_one("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if row is None:
            return None
        return StoredConversation(row["id"], row["owner"], row["created_at"], json.loads(row["metadata"] or "{}"))

    def set_metadata(self, conversation_id: str, metadata: dict[str, str]) -> bool:
        return (
            self.db.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ?", (json.dumps(metadata), conversation_id)
            )
            > 0
        )

    def delete(self, conversation_id: str) -> bool:
        with self.db.transaction() as cur:
            cur.execute("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
            return cur.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def add_items(self, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Add ``items`` after the conversation's others; False when it is no longer stored (deleted
        meanwhile). Raises DuplicateItemError (nothing added)."""
        with self.db.transaction() as cur:
            if cur.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                return False
            _insert(cur, conversation_id, items)
            return True

    def items(self, conversation_id: str) -> list[dict[str, Any]]:
        """The conversation's items, oldest first."""
        rows = self.db.query(
            "SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
        )
        return [json.loads(row["item"]) for row in rows]

    def item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        row = self.db.query_one(
            "SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id)
        )
        return None if row is None else json.loads(row["item"])

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        return (
            self.db.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id)
            )
            > 0
        )


def _insert(cur: sqlite3.Cursor, conversation_id: str, items: list[dict[str, Any]]) -> None:
    """Add ``items`` (in a transaction: checked, then written). Raises DuplicateItemError."""
    ids = [item["id"] for item in items]
    marks = ", ".join("?" * len(ids))
    query = f"SELECT id FROM conversation_items WHERE conversation_id = ? AND id IN ({marks})"
    taken = {row[0] for row in cur.execute(query, (conversation_id, *ids))} if ids else set()
    if clash := next((i for n, i in enumerate(ids) if i in taken or i in ids[:n]), None):
        raise DuplicateItemError(clash)
    cur.executemany(
        "INSERT INTO conversation_items (conversation_id, id, item) VALUES (?, ?, ?)",
        [(conversation_id, item["id"], json.dumps(item)) for item in items],
    )
