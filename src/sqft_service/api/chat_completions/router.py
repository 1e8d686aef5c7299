"""``GET /v1/chat/completions[/{id}[/messages]]``, ``POST`` and ``DELETE /v1/chat/completions/{id}``:
the chat completions stored with ``store: true`` (``POST /v1/chat/completions`` answers in
``api/inference``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from ..limits import JOBS_PAGE, metadata_filter
from ..openapi import error_responses, metadata_query
from .protocol import StoredCompletionDeleted, StoredCompletionList, UpdateStoredCompletion
from .service import StoredCompletionService, body

router = APIRouter(prefix="/v1/chat/completions", tags=["chat completions"])


def _service(request: Request) -> StoredCompletionService:
    return request.app.state.stored_completion_service


def _page(data: list[dict[str, Any]], more: bool) -> StoredCompletionList:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return StoredCompletionList(data=data, has_more=more, first_id=first, last_id=last)


@router.get("", response_model=StoredCompletionList, openapi_extra=metadata_query("completions"))
def list_stored(
    request: Request,
    after: str | None = None,
    limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1]),
    order: Literal["asc", "desc"] = "asc",
    model: str | None = None,
) -> StoredCompletionList:
    """``metadata[key]=value`` query parameters keep the completions whose metadata has every pair."""
    found, more = _service(request).list(
        after=after, limit=limit, order=order, model=model, metadata=metadata_filter(request.query_params)
    )
    return _page([body(f) for f in found], more)


@router.get("/{completion_id}", responses=error_responses(404))
def retrieve_stored(request: Request, completion_id: str) -> dict[str, Any]:
    return body(_service(request).get(completion_id))


@router.post("/{completion_id}", responses=error_responses(404))
def update_stored(request: Request, completion_id: str, update: UpdateStoredCompletion) -> dict[str, Any]:
    return body(_service(request).update(completion_id, update.metadata))


@router.delete("/{completion_id}", response_model=StoredCompletionDeleted, responses=error_responses(404))
def delete_stored(request: Request, completion_id: str) -> StoredCompletionDeleted:
    _service(request).delete(completion_id)
    return StoredCompletionDeleted(id=completion_id)


@router.get("/{completion_id}/messages", response_model=StoredCompletionList, responses=error_responses(404))
def list_messages(
    request: Request,
    completion_id: str,
    after: str | None = None,
    limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1]),
    order: Literal["asc", "desc"] = "asc",
) -> StoredCompletionList:
    return _page(*_service(request).messages(completion_id, after=after, limit=limit, order=order))
