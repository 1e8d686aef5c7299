"""``POST /tokenize`` and ``POST /detokenize``, as vLLM's OpenAI-compatible server has them: a prompt's
token ids as the service's own routes render it (a completion prompt as ``/v1/completions`` does, chat
messages and tools as ``/v1/chat/completions`` does, the generation prompt included), so a client can
count a prompt against the model's context before sending it; and token ids back to text."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...inference.answer import chat_renderer, check_token_ids, completion_renderer
from ..openapi import error_responses
from .protocol import MAX_TOOLS, Message, TokenIds, Tool

router = APIRouter(tags=["inference"])
ERRORS = error_responses(404, 429, 503)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(max_length=4096)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)

    @model_validator(mode="after")
    def _one_prompt(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` (a completion's) or `messages` (a chat's)")
        if self.tools and self.messages is None:
            raise ValueError("`tools` are rendered into a chat: they need `messages`")
        return self

    def render(self, spec: Any) -> Any:
        if self.messages is None:
            return completion_renderer(self.prompt or "")
        tools = [t.model_dump() for t in self.tools] if self.tools else None
        return chat_renderer(spec, [m.as_dict() for m in self.messages], tools)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the model's context in tokens (0: its config doesn't say)
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(max_length=4096)
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    service = request.app.state.inference_service
    ids, context = await service.prepared(body.model, body.render)
    return TokenizeResponse(count=len(ids), max_model_len=context, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    service = request.app.state.inference_service
    text, _ = await service.prepared(body.model, lambda spec: _decoder(body.tokens))
    return DetokenizeResponse(prompt=text)


def _decoder(ids: list[int]) -> Any:
    def decode(tokenizer: Any) -> str:
        check_token_ids(tokenizer, ids, "tokens")
        return tokenizer.decode(ids)

    return decode
