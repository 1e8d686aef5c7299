"""OpenAI's Conversations API: a conversation holds items (messages, function calls and their outputs)
that responses made in it (``conversation`` on ``POST /v1/responses``) read as history and add to."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..limits import Metadata
from ..responses.protocol import InputItem, InputItemList

MAX_ITEMS_PER_CALL = 20  # OpenAI's: items added at once


class CreateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[InputItem] | None = Field(None, max_length=MAX_ITEMS_PER_CALL)
    metadata: Metadata | None = None


class UpdateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Metadata


class AddItems(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[InputItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


# A conversation's items are listed as a response's input items are.
ConversationItemList = InputItemList
