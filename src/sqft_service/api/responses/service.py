"""The Responses API on the inference service: a response is a chat completion with one choice,
rendered, sampled and held to ``text.format`` as ``/v1/chat/completions`` does (``api/inference``),
answered as a response object or as Responses' typed stream events, and stored (``store``, the
default) for ``GET``, ``DELETE`` and ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from pydantic import ValidationError

from ...errors import InvalidRequestError, NotFoundError, ServiceError, UserError
from ...inference.engine import drain
from ...inference.spec import Choice
from ...store.ids import new_id
from ...store.responses import ResponseStore
from ...tool_calls import CallParser, HeldStream
from ..body import validation_error_to_service_error
from ..inference.protocol import ChatCompletionRequest
from ..inference.service import InferenceService
from ..limits import page_of
from ..owner import current_owner, owned_by_caller
from .protocol import (
    DeletedResponse,
    InputItemList,
    Response,
    ResponseRequest,
    answer_output,
    call_item,
    chat_call,
    message_item,
)

T = TypeVar("T")
# The chat request's fields, as the Responses request names them (in errors).
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


class ResponseService:
    def __init__(self, inference: InferenceService, store: ResponseStore) -> None:
        self.inference = inference
        self.store = store
        self._running: dict[str, _Running] = {}  # background responses being generated, by id

    async def create(self, req: ResponseRequest) -> Response | Iterator[str]:
        if req.background and req.stream:
            raise UserError("`background` with `stream` is not supported: poll GET /v1/responses/{id}", param="stream")
        if req.background and not req.store:
            raise UserError("`background: true` needs `store: true`: its answer is read from the store", param="store")
        turns = await asyncio.to_thread(self._history, req.previous_response_id) + req.messages()
        chat = chat_request(req, turns)
        response, item_id, owner = Response.begun(new_id("resp", "_"), req), new_id("msg", "_"), current_owner()
        keep = _Keep(self.store, req.input_items(), turns, owner)
        if req.background:
            n_prompt, sink, cancel = await _named(self.inference.chat_stream(chat))
            queued = response.model_copy(update={"status": "queued"})
            running = self._running[queued.id] = _Running(cancel)
            await asyncio.to_thread(self.store.put, queued.model_dump(), keep.items, turns, owner)
            args = (queued, chat, n_prompt, sink, running, turns)
            threading.Thread(target=self._background, args=args, name=f"sqft-{queued.id}", daemon=True).start()
            return queued
        if req.stream:
            n_prompt, sink, cancel = await _named(self.inference.chat_stream(chat))
            return self._events(response, item_id, n_prompt, sink, cancel, keep, chat.call_parser)
        n_prompt, (choice,) = await _named(self.inference.chat_answer(chat))
        done, content, calls = responded(response, chat, n_prompt, choice)
        await asyncio.to_thread(keep, done, content, calls)
        return done

    def get(self, response_id: str) -> Response:
        return Response.model_validate(self._stored(response_id, "response_id").body)

    def input_items(self, response_id: str, after: str | None, limit: int, order: str) -> InputItemList:
        """The response's own input items, newest first unless ``order`` is ``asc``; ``after`` an item id."""
        items = self._stored(response_id, "response_id").input_items
        what = f"input item of response '{response_id}'"
        page, more = page_of(
            items, lambda i: i["id"], after=after, limit=limit, newest_first=order == "desc", what=what
        )
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return InputItemList(data=page, first_id=first, last_id=last, has_more=more)

    def cancel(self, response_id: str) -> Response:
        """Stop a background response: ``cancelled`` (one that has ended stays as it ended)."""
        stored = self._stored(response_id, "response_id")
        if not stored.body.get("background"):
            raise InvalidRequestError(
                f"Response '{response_id}' was not created with `background: true`; only those can be cancelled",
                param="response_id",
            )
        running = self._running.get(response_id)
        if running is not None and running.end():
            running.cancel.set()  # the engine stops at its next token
            cancelled = {**stored.body, "status": "cancelled"}
            self.store.update(response_id, cancelled)
            return Response.model_validate(cancelled)
        return self.get(response_id)

    def shutdown(self) -> None:
        """Stop the background generations; what they stored is marked failed at the next start."""
        for running in list(self._running.values()):
            if running.end():
                running.cancel.set()

    def delete(self, response_id: str) -> DeletedResponse:
        self._stored(response_id, "response_id")
        self.store.delete(response_id)
        return DeletedResponse(id=response_id)

    # ------------------------------------------------------------ helpers
    def _stored(self, response_id: str, param: str) -> Any:
        stored = self.store.get(response_id)
        if stored is None or not owned_by_caller(stored.owner):
            raise NotFoundError(f"No response found with id '{response_id}'", param=param)
        return stored

    def _history(self, previous: str | None) -> list[dict[str, Any]]:
        if previous is None:
            return []
        stored = self._stored(previous, "previous_response_id")
        if (status := stored.body.get("status")) not in ("completed", "incomplete"):
            raise InvalidRequestError(
                f"Response '{previous}' is {status}: only an answered response can be continued",
                param="previous_response_id",
            )
        return list(stored.conversation)

    def _background(
        self,
        response: Response,
        chat: ChatCompletionRequest,
        n_prompt: int,
        sink: queue.Queue,
        running: _Running,
        turns: list[dict[str, Any]],
    ) -> None:
        """Drain a background response's generation (its own thread) and store how it ended."""
        final, error = None, None
        try:
            for item in drain(sink):
                if isinstance(item, Exception):
                    error = item
                elif isinstance(item, list):
                    final = item[0]
                elif response.status == "queued":  # its first text: under way
                    response = response.model_copy(update={"status": "in_progress"})
                    with running.lock:
                        if not running.ended:
                            self.store.update(response.id, response.model_dump())
        finally:
            self._running.pop(response.id, None)
        if not running.end():
            return  # cancelled (stored so by cancel), or the service is stopping
        if final is None:
            message = (str(error) or type(error).__name__) if error else "the generation ended without an answer"
            failure = {"code": getattr(error, "code", None) or "server_error", "message": message}
            failed = response.model_copy(update={"status": "failed", "error": failure})
            self.store.update(response.id, failed.model_dump())
            return
        done, content, calls = responded(response, chat, n_prompt, final)
        self.store.update(response.id, done.model_dump(), [*turns, assistant_turn(content, calls)])

    def _events(
        self,
        response: Response,
        item_id: str,
        n_prompt: int,
        sink: queue.Queue,
        cancel: threading.Event,
        keep: _Keep,
        parser: CallParser | None,
    ) -> Iterator[str]:
        """Responses' stream (iterated by Starlette in a worker thread): the response begun, its message
        and text part added, a delta per decoded piece, the text, part and message done, then the
        response ``completed`` (or ``incomplete``, cut by ``max_output_tokens``), stored first.

        With tools, the message is begun with its first text and text is held from a call's start
        (``tool_calls.HeldStream``); the calls follow the message, each an item added, its arguments
        (one delta, then done), the item done."""
        numbers = itertools.count()

        def event(kind: str, **data: Any) -> str:
            payload = {"type": kind, "sequence_number": next(numbers), **data}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        held, begun = (HeldStream(parser) if parser else None), False

        def begin() -> Iterator[str]:
            nonlocal begun
            if not begun:
                begun = True
                yield event("response.output_item.added", output_index=0, item=message_item(item_id, "", "in_progress"))
                yield event("response.content_part.added", **where, part=part)

        def delta(piece: str) -> Iterator[str]:
            if piece:
                yield from begin()
                yield event("response.output_text.delta", **where, delta=piece, logprobs=[])

        try:
            yield event("response.created", response=response.model_dump())
            yield event("response.in_progress", response=response.model_dump())
            if held is None:
                yield from begin()
            text, final = "", None
            for item in drain(sink):
                if isinstance(item, Exception):
                    message = str(item) or type(item).__name__
                    yield event("error", code=getattr(item, "code", None), message=message, param=None)
                    return
                if isinstance(item, list):
                    final = item[0]
                elif item[1]:
                    piece = item[1] if held is None else held.push(item[1])
                    text += piece
                    yield from delta(piece)
            assert final is not None
            parsed: list[dict[str, str]] = []
            if held is not None:
                rest, parsed = held.finish()
                text += rest
                yield from delta(rest)
            output, calls, finish = answer_output(item_id, text, parsed, final.finish_reason)
            if output[0]["type"] == "message":
                yield from begin()
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                yield event("response.content_part.done", **where, part={**part, "text": text})
                yield event("response.output_item.done", output_index=0, item=output[0])
            for index, item in enumerate(output):
                if item["type"] == "function_call":
                    call = {"item_id": item["id"], "output_index": index}
                    yield event("response.output_item.added", output_index=index, item=call_item(item, "in_progress"))
                    yield event("response.function_call_arguments.delta", **call, delta=item["arguments"])
                    yield event("response.function_call_arguments.done", **call, arguments=item["arguments"])
                    yield event("response.output_item.done", output_index=index, item=item)
            done = response.ended(output, finish, n_prompt, final.completion_tokens)
            keep(done, text or None if calls else text, calls)
            yield event(f"response.{done.status}", response=done.model_dump())
        finally:
            cancel.set()  # the client left, or the stream ended: stop generating either way


class _Keep:
    """Stores an ended response (when its ``store`` says so) with its input items and conversation."""

    def __init__(
        self, store: ResponseStore, items: list[dict[str, Any]], turns: list[dict[str, Any]], owner: str | None
    ) -> None:
        self.store, self.items, self.turns, self.owner = store, items, turns, owner

    def __call__(self, response: Response, content: str | None, calls: list[dict[str, str]]) -> None:
        """``content`` and ``calls``: the answer's text and its calls (with ids: ``answer_output``)."""
        if response.store:
            self.store.put(response.model_dump(), self.items, [*self.turns, assistant_turn(content, calls)], self.owner)


class _Running:
    """A background response being generated: the event that stops it, and whether its end is decided
    (by its generation ending, a cancel, or the service stopping: whichever comes first writes it)."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel, self.lock, self.ended = cancel, threading.Lock(), False

    def end(self) -> bool:
        """True for the first caller only: that one decides how the response ends."""
        with self.lock:
            first, self.ended = not self.ended, True
            return first


def assistant_turn(content: str | None, calls: list[dict[str, str]]) -> dict[str, Any]:
    """An answer as the assistant turn a later response's conversation holds."""
    turn: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:  # a later response's input answers them by call id (previous_response_id)
        turn["tool_calls"] = [chat_call(c) for c in calls]
    return turn


def chat_request(req: ResponseRequest, turns: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that answers ``req``: its instructions as the system message, then ``turns``
    (a stored conversation it continues, then its input).

    Raises:
        UserError: what the chat request refuses, naming the Responses field.
    """
    if req.tools and req.tool_choice != "none" and req.text.format.type != "text":
        raise UserError(
            "`text.format` with `tools` is not supported: send `tool_choice: none`, or no format",
            param="text.format",
        )
    body = {
        "model": req.model,
        "messages": [{"role": "system", "content": req.instructions}, *turns] if req.instructions else turns,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        **req.chat_tools(),
    }
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:  # e.g. a conversation longer than a chat request may be
        error = validation_error_to_service_error(list(exc.errors()))
        error.param = response_param(error.param)
        raise error from None
    chat.response_format = req.text.response_format  # built (and checked) with the request
    return chat


def response_param(param: str | None) -> str | None:
    """A chat request's field as the Responses request names it (in errors)."""
    return _PARAMS.get((param or "").split(".")[0], param)


def responded(
    response: Response, chat: ChatCompletionRequest, n_prompt: int, choice: Choice
) -> tuple[Response, str | None, list[dict[str, str]]]:
    """``response`` (begun) ended with ``choice``, the answer to its chat request ``chat``; and the
    answer's text and calls (with ids: ``answer_output``)."""
    content, parsed = chat.call_parser.split(choice.text) if chat.call_parser else (choice.text, [])
    output, calls, finish = answer_output(new_id("msg", "_"), content, parsed, choice.finish_reason)
    return response.ended(output, finish, n_prompt, choice.completion_tokens), content, calls


async def _named(call: Awaitable[T]) -> T:
    """``call``'s result; its errors name the Responses request's fields, not the chat request's."""
    try:
        return await call
    except (ServiceError, UserError) as exc:
        exc.param = response_param(exc.param)
        raise
