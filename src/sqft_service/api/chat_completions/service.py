"""The caller's stored chat completions: each is the completion as answered, with the ``metadata`` it
was stored with (OpenAI's shape), and its request's messages under ids ``<completion id>-<index>``."""

from __future__ import annotations

from typing import Any

from ...errors import NotFoundError
from ...store.chat_completions import ChatCompletionStore, StoredCompletion
from ..owner import current_owner, owned_by_caller


class StoredCompletionService:
    def __init__(self, store: ChatCompletionStore) -> None:
        self.store = store

    def get(self, completion_id: str) -> StoredCompletion:
        found = self.store.get(completion_id)
        if found is None or not owned_by_caller(found.owner):
            raise NotFoundError(f"No such stored chat completion: {completion_id}", param="completion_id")
        return found

    def list(
        self, *, after: str | None, limit: int, order: str, model: str | None, metadata: dict[str, str] | None
    ) -> tuple[list[StoredCompletion], bool]:
        return self.store.list(
            owner=current_owner(), after=after, limit=limit, descending=order == "desc", model=model, metadata=metadata
        )

    def update(self, completion_id: str, metadata: dict[str, str] | None) -> StoredCompletion:
        self.get(completion_id)
        self.store.update_metadata(completion_id, metadata)
        return self.get(completion_id)

    def delete(self, completion_id: str) -> None:
        self.get(completion_id)
        self.store.delete(completion_id)

    def messages(
        self, completion_id: str, *, after: str | None, limit: int, order: str
    ) -> tuple[list[dict[str, Any]], bool]:
        found = self.get(completion_id)
        messages = [{"id": f"{found.id}-{i}", **_message(m)} for i, m in enumerate(found.request.get("messages", []))]
        if order == "desc":
            messages.reverse()
        start = next((n + 1 for n, m in enumerate(messages) if m["id"] == after), 0) if after else 0
        return messages[start : start + limit], start + limit < len(messages)


def body(found: StoredCompletion) -> dict[str, Any]:
    """The stored completion as OpenAI answers it: the completion object with its metadata."""
    return {**found.response, "metadata": found.metadata}


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A request message as OpenAI lists it: its text content (parts joined), role, name and calls; a
    message with images also has its parts as sent (``content_parts``)."""
    content = message.get("content")
    if isinstance(content, list):
        parts = content
        content = "".join(part.get("text", "") for part in parts)
        if any(part.get("type") == "image_url" for part in parts):
            return {**message, "content": content, "content_parts": parts}
    return {**message, "content": content}
