"""``POST /v1/responses`` (``stream: true`` answers Responses' SSE events; ``background: true`` answers
at once, to be polled, or streams events a reader can resume: ``GET /v1/responses/{response_id}?stream=true
&starting_after=N``), ``GET`` and ``DELETE /v1/responses/{response_id}``, ``POST
/v1/responses/{response_id}/cancel``, ``GET /v1/responses/{response_id}/input_items``, ``POST
/v1/responses/input_tokens`` (OpenAI's Responses API, text in and out)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from ...errors import UserError
from ..openapi import error_responses
from ..sse import event_stream
from .protocol import DeletedResponse, InputItemList, InputTokens, InputTokensRequest, Response, ResponseRequest
from .service import ResponseService

router = APIRouter(prefix="/v1/responses", tags=["responses"])


def _service(request: Request) -> ResponseService:
    return request.app.state.response_service


@router.post("", response_model=Response, responses=error_responses(404, 429, 503))
async def create_response(request: Request, body: ResponseRequest):
    answer = await _service(request).create(body)
    return answer if isinstance(answer, Response) else event_stream(answer)


@router.post("/input_tokens", response_model=InputTokens, responses=error_responses(404))
async def count_input_tokens(request: Request, body: InputTokensRequest) -> InputTokens:
    """The prompt tokens a response made of ``body`` would count (OpenAI's input token counts)."""
    return await _service(request).input_tokens(body)


@router.get("/{response_id}", response_model=Response, responses=error_responses(404))
def retrieve_response(
    request: Request,
    response_id: str,
    stream: bool = False,
    starting_after: int | None = Query(None, ge=0, description="with `stream`: the events after this sequence number"),
):
    """The response; with ``stream=true`` (a background response's), its events as SSE: followed while it
    runs, replayed once it has ended."""
    if stream:
        return event_stream(_service(request).stream(response_id, starting_after))
    if starting_after is not None:
        raise UserError("`starting_after` is read with `stream=true` only", param="starting_after")
    return _service(request).get(response_id)


@router.post("/{response_id}/cancel", response_model=Response, responses=error_responses(404))
def cancel_response(request: Request, response_id: str) -> Response:
    """Stop a ``background`` response (OpenAI's); one that has ended is answered as it ended."""
    return _service(request).cancel(response_id)


@router.get("/{response_id}/input_items", response_model=InputItemList, responses=error_responses(404))
def list_input_items(
    request: Request,
    response_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> InputItemList:
    return _service(request).input_items(response_id, after, limit, order)


@router.delete("/{response_id}", response_model=DeletedResponse, responses=error_responses(404))
def delete_response(request: Request, response_id: str) -> DeletedResponse:
    return _service(request).delete(response_id)
