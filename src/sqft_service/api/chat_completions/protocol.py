"""Stored chat completions (OpenAI's ``/v1/chat/completions`` with ``store: true``, then ``GET``,
``POST`` (metadata), ``DELETE`` and ``/messages``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..limits import Metadata


class UpdateStoredCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Metadata | None  # null clears it


class StoredCompletionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class StoredCompletionDeleted(BaseModel):
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    id: str
    deleted: bool = True
