"""Conversations kept in the store, each its project's own; their items as history for responses."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import TypeAdapter

from ...errors import InvalidRequestError, NotFoundError
from ...store.conversations import ConversationStore, DuplicateItemError, StoredConversation
from ...store.ids import new_id
from ..limits import page_of
from ..owner import current_owner, owned_by_caller
from ..responses.protocol import InputItem, turns_of
from .protocol import Conversation, ConversationDeleted, ConversationItemList, CreateConversation

_ITEMS = TypeAdapter(list[InputItem])
log = logging.getLogger(__name__)


class ConversationService:
    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def create(self, body: CreateConversation) -> Conversation:
        stored = StoredConversation(new_id("conv", "_"), current_owner(), int(time.time()), body.metadata or {})
        with _named("items"):
            self.store.create(stored, [item.listed() for item in body.items or ()])
        return _conversation(stored)

    def get(self, conversation_id: str) -> Conversation:
        return _conversation(self.stored(conversation_id, "conversation_id"))

    def update(self, conversation_id: str, metadata: dict[str, str]) -> Conversation:
        self.stored(conversation_id, "conversation_id")
        self.store.set_metadata(conversation_id, metadata)
        return self.get(conversation_id)

    def delete(self, conversation_id: str) -> ConversationDeleted:
        self.stored(conversation_id, "conversation_id")
        self.store.delete(conversation_id)
        return ConversationDeleted(id=conversation_id)

    def add_items(self, conversation_id: str, items: list[Any]) -> ConversationItemList:
        self.stored(conversation_id, "conversation_id")
        listed = [item.listed() for item in items]
        with _named("items"):
            self.store.add_items(conversation_id, listed)
        return ConversationItemList.of(listed)

    def items(self, conversation_id: str, after: str | None, limit: int, order: str) -> ConversationItemList:
        self.stored(conversation_id, "conversation_id")
        what = f"item of conversation '{conversation_id}'"
        page, more = page_of(
            self.store.items(conversation_id),
            lambda i: i["id"],
            after=after,
            limit=limit,
            newest_first=order == "desc",
            what=what,
        )
        return ConversationItemList.of(page, more)

    def item(self, conversation_id: str, item_id: str) -> dict[str, Any]:
        self.stored(conversation_id, "conversation_id")
        if (item := self.store.item(conversation_id, item_id)) is None:
            raise NotFoundError(f"Conversation '{conversation_id}' has no item '{item_id}'", param="item_id")
        return item

    def delete_item(self, conversation_id: str, item_id: str) -> Conversation:
        self.item(conversation_id, item_id)
        self.store.delete_item(conversation_id, item_id)
        return self.get(conversation_id)

    # ------------------------------------------------------------ for responses
    def stored(self, conversation_id: str, param: str) -> StoredConversation:
        stored = self.store.get(conversation_id)
        if stored is None or not owned_by_caller(stored.owner):
            raise NotFoundError(f"No conversation found with id '{conversation_id}'", param=param)
        return stored

    def history(self, conversation_id: str, new_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation's items as the chat turns a response made in it continues; ``new_items`` (the
        response's input, added when it ends) must not repeat an item it holds (a 400 naming ``input``)."""
        self.stored(conversation_id, "conversation")
        items = self.store.items(conversation_id)
        held = {item["id"] for item in items}
        if clash := next((i["id"] for i in new_items if i["id"] in held), None):
            raise InvalidRequestError(
                f"Item '{clash}' is already in conversation '{conversation_id}': send only what is new",
                param="input",
            )
        return turns_of(_ITEMS.validate_python(items))

    def append(self, conversation_id: str, items: list[dict[str, Any]]) -> None:
        """Add a response's input and output (it ended): not when the conversation was deleted meanwhile,
        nor items another response added meanwhile (the same input sent twice at once: kept once)."""
        try:
            self.store.add_items(conversation_id, items)
        except DuplicateItemError as exc:
            log.warning("conversation %s already holds item %s: a response's not added", conversation_id, exc.item_id)


def _conversation(stored: StoredConversation) -> Conversation:
    return Conversation(id=stored.id, created_at=stored.created_at, metadata=stored.metadata)


@contextmanager
def _named(param: str) -> Iterator[None]:
    """A duplicate item id as a 400 naming ``param``."""
    try:
        yield
    except DuplicateItemError as exc:
        raise InvalidRequestError(f"Item id '{exc.item_id}' is given twice in this conversation", param=param) from None
