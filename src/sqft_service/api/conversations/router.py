"""``/v1/conversations`` (OpenAI's Conversations API): create, retrieve, update (metadata) and delete a
conversation; add, list, retrieve and delete its items."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from ..openapi import error_responses
from .protocol import (
    AddItems,
    Conversation,
    ConversationDeleted,
    ConversationItemList,
    CreateConversation,
    UpdateConversation,
)
from .service import ConversationService

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
ERRORS = error_responses(404)


def _service(request: Request) -> ConversationService:
    return request.app.state.conversation_service


@router.post("", response_model=Conversation)
def create_conversation(request: Request, body: CreateConversation) -> Conversation:
    return _service(request).create(body)


@router.get("/{conversation_id}", response_model=Conversation, responses=ERRORS)
def retrieve_conversation(request: Request, conversation_id: str) -> Conversation:
    return _service(request).get(conversation_id)


@router.post("/{conversation_id}", response_model=Conversation, responses=ERRORS)
def update_conversation(request: Request, conversation_id: str, body: UpdateConversation) -> Conversation:
    return _service(request).update(conversation_id, body.metadata)


@router.delete("/{conversation_id}", response_model=ConversationDeleted, responses=ERRORS)
def delete_conversation(request: Request, conversation_id: str) -> ConversationDeleted:
    return _service(request).delete(conversation_id)


@router.post("/{conversation_id}/items", response_model=ConversationItemList, responses=ERRORS)
def add_items(request: Request, conversation_id: str, body: AddItems) -> ConversationItemList:
    return _service(request).add_items(conversation_id, body.items)


@router.get("/{conversation_id}/items", response_model=ConversationItemList, responses=ERRORS)
def list_items(
    request: Request,
    conversation_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> ConversationItemList:
    return _service(request).items(conversation_id, after, limit, order)


@router.get("/{conversation_id}/items/{item_id}", responses=ERRORS)
def retrieve_item(request: Request, conversation_id: str, item_id: str) -> dict[str, Any]:
    return _service(request).item(conversation_id, item_id)


@router.delete("/{conversation_id}/items/{item_id}", response_model=Conversation, responses=ERRORS)
def delete_item(request: Request, conversation_id: str, item_id: str) -> Conversation:
    return _service(request).delete_item(conversation_id, item_id)
