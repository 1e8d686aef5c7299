"""``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's routes; ``stream: true`` answers SSE)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request

from ..openapi import error_responses
from ..sse import event_stream
from .protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from .service import InferenceService

router = APIRouter(tags=["inference"])
# 404: `model` names no model of the caller's (GET /v1/models lists them); 429: the inference queue is full.
ERRORS = error_responses(404, 429, 503)


def _service(request: Request) -> InferenceService:
    return request.app.state.inference_service


def _respond(answer: ChatCompletion | Completion | Iterator[str]):
    return answer if isinstance(answer, ChatCompletion | Completion) else event_stream(answer)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(request: Request, body: ChatCompletionRequest):
    return _respond(await _service(request).chat(body))


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(request: Request, body: CompletionRequest):
    return _respond(await _service(request).complete(body))
