"""The Responses API on the inference service: a response is a chat completion with one choice,
rendered, sampled and held to ``text.format`` as ``/v1/chat/completions`` does (``api/inference``),
answered as a response object or as Responses' typed stream events, and stored (``store``, the
default) for ``GET``, ``DELETE`` and ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ...errors import InvalidRequestError, NotFoundError, ServiceError, UserError
from ...inference.answer import chat_renderer
from ...inference.spec import Choice
from ...store.ids import new_id
from ...store.responses import ResponseStore
from ...tool_calls import CallParser
from ..body import validation_error_to_service_error
from ..conversations.service import ConversationService
from ..inference.protocol import ChatCompletionRequest
from ..inference.service import InferenceService
from ..limits import page_of
from ..owner import current_owner, owned_by_caller
from .events import EventLog, answer_events, error_data, mapped, replayed, returned, sse
from .protocol import (
    DeletedResponse,
    InputItemList,
    InputTokens,
    Response,
    ResponseRequest,
    answer_output,
    chat_call,
    token_logprobs,
)
from .truncation import fits, fitting

T = TypeVar("T")
log = logging.getLogger(__name__)
# The chat request's fields, as the Responses request names them (in errors).
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


class ResponseService:
    def __init__(self, inference: InferenceService, store: ResponseStore, conversations: ConversationService) -> None:
        self.inference = inference
        self.store = store
        self.conversations = conversations
        self._running: dict[str, _Running] = {}  # background responses being generated, by id

    async def create(self, req: ResponseRequest) -> Response | Iterator[str]:
        if req.background and not req.store:
            raise UserError("`background: true` needs `store: true`: its answer is read from the store", param="store")
        items = req.input_items()
        turns = await asyncio.to_thread(self._history, req, items) + req.messages()
        chat = await self._chat(req, turns)
        response, item_id, owner = Response.begun(new_id("resp", "_"), req), new_id("msg", "_"), current_owner()
        keep = _Keep(self.store, items, turns, owner, self.conversations, req.conversation_id)
        if req.background:
            n_prompt, sink, cancel = await _named(self.inference.chat_stream(chat))
            queued = response.model_copy(update={"status": "queued"})
            running = self._running[queued.id] = _Running(cancel)
            await asyncio.to_thread(self.store.put, queued.model_dump(), keep.items, turns, owner)
            for kind in ("response.created", "response.queued"):
                running.log.add(kind, {"response": queued.model_dump()})
            args = (queued, item_id, n_prompt, sink, chat.call_parser, running, keep)
            threading.Thread(target=self._background, args=args, name=f"sqft-{queued.id}", daemon=True).start()
            return running.log.follow(None) if req.stream else queued
        if req.stream:
            n_prompt, sink, cancel = await _named(self.inference.chat_stream(chat))
            return self._events(response, item_id, n_prompt, sink, cancel, keep, chat.call_parser)
        n_prompt, (choice,) = await _named(self.inference.chat_answer(chat))
        done, content, calls = responded(response, chat, n_prompt, choice)
        await asyncio.to_thread(keep, done, content, calls)
        return done

    async def input_tokens(self, body: BaseModel) -> InputTokens:
        """How many tokens the prompt of a response made of ``body`` (``InputTokensRequest``) would be:
        rendered as ``create`` renders it, its conversation or previous response and ``truncation``
        included."""
        req = ResponseRequest.model_validate(body.model_dump(by_alias=True, exclude_unset=True))
        turns = await asyncio.to_thread(self._history, req, req.input_items()) + req.messages()
        ids, _ = await self._prompt(await self._chat(req, turns))
        return InputTokens(input_tokens=len(ids))

    async def _chat(self, req: ResponseRequest, turns: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request that answers ``req`` after ``turns``: with ``truncation: "auto"``, without the
        oldest turns that do not fit (each measured on the engine's worker; ``truncation.py``). The
        stored conversation keeps them all: the next response fits it again."""
        if req.truncation != "auto":
            return chat_request(req, turns)
        search = fitting(turns)
        candidate = next(search)
        while True:
            ids, context = await self._prompt(chat_request(req, candidate))
            try:
                candidate = search.send(fits(len(ids), context, req.max_output_tokens))
            except StopIteration as stop:
                return chat_request(req, stop.value)

    async def _prompt(self, chat: ChatCompletionRequest) -> tuple[list[int], int]:
        """``chat``'s prompt tokens and its model's context length, measured on the engine's worker."""
        return await _named(self.inference.prepared(chat.model, lambda spec: chat_renderer(spec, *chat.conversation())))

    def get(self, response_id: str) -> Response:
        return Response.model_validate(self._stored(response_id, "response_id").body)

    def stream(self, response_id: str, after: int | None) -> Iterator[str]:
        """A background response's events after sequence number ``after`` (all when None): followed as
        they come while it runs, replayed once it has ended."""
        stored = self._stored(response_id, "response_id")
        if not stored.body.get("background"):
            raise InvalidRequestError(
                f"Response '{response_id}' was not created with `background: true`; only those can be streamed "
                "again (a foreground stream ends with its connection)",
                param="stream",
            )
        if (running := self._running.get(response_id)) is not None:
            return running.log.follow(after)
        stored = self.store.get(response_id) or stored  # as it ended: stored before it stopped running
        return replayed(stored.body, stored.events, after)

    def input_items(self, response_id: str, after: str | None, limit: int, order: str) -> InputItemList:
        """The response's own input items, newest first unless ``order`` is ``asc``; ``after`` an item id."""
        items = self._stored(response_id, "response_id").input_items
        what = f"input item of response '{response_id}'"
        page, more = page_of(
            items, lambda i: i["id"], after=after, limit=limit, newest_first=order == "desc", what=what
        )
        return InputItemList.of(page, more)

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
            running.log.close(keep=lambda events: self.store.update(response_id, cancelled, events=events))
            return Response.model_validate(cancelled)
        return self.get(response_id)

    def shutdown(self) -> None:
        """Stop the background generations; what they stored is marked failed at the next start."""
        for running in list(self._running.values()):
            if running.end():
                running.cancel.set()
                running.log.close()

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

    def _history(self, req: ResponseRequest, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The turns ``req`` continues: its previous response's, or its conversation's (``items``, its
        input, must be new to it)."""
        if req.conversation_id is not None:
            if req.previous_response_id is not None:
                raise InvalidRequestError(
                    "`conversation` and `previous_response_id` cannot both be given: a response continues one",
                    param="conversation",
                )
            return self.conversations.history(req.conversation_id, items)
        if req.previous_response_id is None:
            return []
        stored = self._stored(req.previous_response_id, "previous_response_id")
        if (status := stored.body.get("status")) not in ("completed", "incomplete"):
            raise InvalidRequestError(
                f"Response '{req.previous_response_id}' is {status}: only an answered response can be continued",
                param="previous_response_id",
            )
        return list(stored.conversation)

    def _background(
        self,
        response: Response,
        item_id: str,
        n_prompt: int,
        sink: queue.Queue,
        parser: CallParser | None,
        running: _Running,
        keep: _Keep,
    ) -> None:
        """Drain a background response's generation (its own thread) into its event log, storing it in
        progress at its first event and as it ended at its last."""

        def record(kind: str, data: dict[str, Any]) -> None:
            if kind == "response.in_progress":
                with running.lock:
                    if not running.ended:
                        self.store.update(response.id, data["response"])
            running.log.add(kind, data)

        try:
            try:
                answer = returned(mapped(answer_events(response, item_id, n_prompt, sink, parser), record))
            except Exception as exc:  # a fault of ours: the response fails, its readers are not left waiting
                log.exception("background response %s", response.id)
                running.cancel.set()
                answer = exc
            if not running.end():
                return  # cancelled (stored so by cancel), or the service is stopping
            if isinstance(answer, Exception):
                ended, turns = response.model_copy(update={"status": "failed", "error": error_data(answer)}), None
            else:
                ended, content, calls = answer
                turns = [*keep.turns, assistant_turn(content, calls)]
            body = ended.model_dump()

            def stored(events: list[dict[str, Any]]) -> None:
                self.store.update(response.id, body, turns, events=events)
                keep.converse(ended)

            running.log.close((f"response.{ended.status}", {"response": body}), stored)
        finally:
            self._running.pop(response.id, None)

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
        """Responses' stream (iterated by Starlette in a worker thread): the response created, its answer's
        events (``events.answer_events``), then the response ``completed`` (or ``incomplete``, cut by
        ``max_output_tokens``), stored first; an ``error`` event when the generation failed."""
        numbers = itertools.count()

        def event(kind: str, data: dict[str, Any]) -> str:
            return sse({"type": kind, "sequence_number": next(numbers), **data})

        try:
            yield event("response.created", {"response": response.model_dump()})
            answer = yield from mapped(answer_events(response, item_id, n_prompt, sink, parser), event)
            if isinstance(answer, Exception):
                yield event("error", {**error_data(answer), "param": None})
                return
            done, content, calls = answer
            keep(done, content, calls)
            yield event(f"response.{done.status}", {"response": done.model_dump()})
        finally:
            cancel.set()  # the client left, or the stream ended: stop generating either way


class _Keep:
    """Stores an ended response (when its ``store`` says so) with its input items and conversation, and
    adds its input and output to the conversation it was made in (``conversation``), if any."""

    def __init__(
        self,
        store: ResponseStore,
        items: list[dict[str, Any]],
        turns: list[dict[str, Any]],
        owner: str | None,
        conversations: ConversationService,
        conversation_id: str | None,
    ) -> None:
        self.store, self.items, self.turns, self.owner = store, items, turns, owner
        self.conversations, self.conversation_id = conversations, conversation_id

    def __call__(self, response: Response, content: str | None, calls: list[dict[str, str]]) -> None:
        """``content`` and ``calls``: the answer's text and its calls (with ids: ``answer_output``)."""
        if response.store:
            self.store.put(response.model_dump(), self.items, [*self.turns, assistant_turn(content, calls)], self.owner)
        self.converse(response)

    def converse(self, response: Response) -> None:
        """Add the response's input and output to its conversation, once it has answered."""
        if self.conversation_id is not None and response.status in ("completed", "incomplete"):
            self.conversations.append(self.conversation_id, [*self.items, *response.output])


class _Running:
    """A background response being generated: the event that stops it, its events, and whether its end is decided
    (by its generation ending, a cancel, or the service stopping: whichever comes first writes it)."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel, self.lock, self.ended, self.log = cancel, threading.Lock(), False, EventLog()

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
    if req.tools and req.tool_choice != "none" and req.scored:  # a call's tokens are not its message's text
        raise UserError("log-probabilities with `tools` are not supported: send `tool_choice: none`", param="include")
    body = {
        "model": req.model,
        "messages": [{"role": "system", "content": req.instructions}, *turns] if req.instructions else turns,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        **req.chat_tools(),
        **({"logprobs": True, "top_logprobs": req.top_logprobs or 0} if req.scored else {}),
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
    logprobs = None if choice.logprobs is None else token_logprobs(choice.logprobs)
    output, calls, finish = answer_output(new_id("msg", "_"), content, parsed, choice.finish_reason, logprobs)
    return response.ended(output, finish, n_prompt, choice.completion_tokens), content, calls


async def _named(call: Awaitable[T]) -> T:
    """``call``'s result; its errors name the Responses request's fields, not the chat request's."""
    try:
        return await call
    except (ServiceError, UserError) as exc:
        exc.param = response_param(exc.param)
        raise
