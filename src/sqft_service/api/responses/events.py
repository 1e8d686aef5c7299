"""Responses' stream events: built from a generation as it runs (``answer_events``), written as SSE,
and, for a background response, kept in an ``EventLog`` that any number of readers follow and that a
reader who lost its connection resumes from a sequence number (``GET ...?stream=true&starting_after=``).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

from ...inference.engine import drain
from ...tool_calls import CallParser, HeldStream
from .protocol import Response, answer_output, call_item, message_item, token_logprobs

Event = tuple[str, dict[str, Any]]  # its type and its data, before a sequence number is given
Answer = tuple[Response, "str | None", list[dict[str, str]]]  # the ended response, its text and its calls

# Between events a follower sends an SSE comment this often: the client (and any proxy) sees the stream is
# alive while a queued response waits, and the server learns soon that a reader has gone.
KEEP_ALIVE_S = 15.0


def answer_events(
    response: Response, item_id: str, n_prompt: int, sink: queue.Queue, parser: CallParser | None
) -> Generator[Event, None, Answer | Exception]:
    """The events of ``response``'s answer as the engine puts it on ``sink``: the response in progress
    (at the first item, so a queued one shows when its generation starts), its message and text part
    added, a delta per decoded piece, the text, part and message done, then its calls; returns the
    ended response with its text and calls (the last event, ``response.completed`` or ``incomplete``, is
    the caller's to send once it has stored it), or the error the generation ended with.

    With tools, the message is begun with its first text and text is held from a call's start
    (``tool_calls.HeldStream``); the calls follow the message, each an item added, its arguments
    (one delta, then done), the item done."""
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    held, begun = (HeldStream(parser) if parser else None), False

    def begin() -> Iterator[Event]:
        nonlocal begun
        if not begun:
            begun = True
            yield "response.output_item.added", {"output_index": 0, "item": message_item(item_id, "", "in_progress")}
            yield "response.content_part.added", {**where, "part": part}

    def delta(piece: str, scores: Any = ()) -> Iterator[Event]:
        if piece:
            yield from begin()
            yield "response.output_text.delta", {**where, "delta": piece, "logprobs": token_logprobs(scores or ())}

    text, final, started = "", None, False
    for item in drain(sink):
        if not started:
            started, response = True, response.model_copy(update={"status": "in_progress"})
            yield "response.in_progress", {"response": response.model_dump()}
            if held is None:
                yield from begin()
        if isinstance(item, Exception):
            return item
        if isinstance(item, list):
            final = item[0]
        elif item[1]:
            piece = item[1] if held is None else held.push(item[1])
            text += piece
            yield from delta(piece, item[2])  # scored only without tools (``chat_request``)
    if final is None:
        return RuntimeError("the generation ended without an answer")
    parsed: list[dict[str, str]] = []
    if held is not None:
        rest, parsed = held.finish()
        text += rest
        yield from delta(rest)
    logprobs = None if final.logprobs is None else token_logprobs(final.logprobs)
    output, calls, finish = answer_output(item_id, text, parsed, final.finish_reason, logprobs)
    if output[0]["type"] == "message":
        yield from begin()
        yield "response.output_text.done", {**where, "text": text, "logprobs": logprobs or []}
        yield "response.content_part.done", {**where, "part": output[0]["content"][0]}
        yield "response.output_item.done", {"output_index": 0, "item": output[0]}
    for index, item in enumerate(output):
        if item["type"] == "function_call":
            call = {"item_id": item["id"], "output_index": index}
            yield "response.output_item.added", {"output_index": index, "item": call_item(item, "in_progress")}
            yield "response.function_call_arguments.delta", {**call, "delta": item["arguments"]}
            yield "response.function_call_arguments.done", {**call, "arguments": item["arguments"]}
            yield "response.output_item.done", {"output_index": index, "item": item}
    done = response.ended(output, finish, n_prompt, final.completion_tokens)
    return done, text or None if calls else text, calls


T = TypeVar("T")
R = TypeVar("R")


def mapped(events: Generator[Event, None, R], each: Callable[[str, dict[str, Any]], T]) -> Generator[T, None, R]:
    """``each(kind, data)`` of every event of ``events`` in turn, then what ``events`` returns (so
    ``answer = yield from mapped(...)`` streams them and keeps the answer; :func:`returned` where
    nothing is streamed)."""
    while True:
        try:
            kind, data = next(events)
        except StopIteration as stop:
            return stop.value
        yield each(kind, data)


def returned(generator: Generator[Any, None, R]) -> R:
    """Run ``generator`` to its end, for what it returns."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


def error_data(error: Exception) -> dict[str, Any]:
    """An ``error`` event's data (and a failed response's ``error``) for what ended a generation."""
    return {"code": getattr(error, "code", None) or "server_error", "message": str(error) or type(error).__name__}


class EventLog:
    """A background response's events, numbered as they are added, until it is closed (ended, cancelled,
    or the service stopping). Readers follow it from any sequence number, each in its own thread."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._closed = False
        self._changed = threading.Condition()

    def add(self, kind: str, data: dict[str, Any]) -> None:
        """Number and keep an event; dropped once the log is closed (a cancelled response's generation
        runs on to its next token: what it makes meanwhile is not its answer)."""
        with self._changed:
            if not self._closed:
                self._events.append({"type": kind, "sequence_number": len(self._events), **data})
                self._changed.notify_all()

    def close(self, last: Event | None = None, keep: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        """Close the log after its ``last`` event; ``keep`` stores its events first (a reader that sees
        the log end finds the response stored as it ended)."""
        with self._changed:
            if last is not None and not self._closed:
                kind, data = last
                self._events.append({"type": kind, "sequence_number": len(self._events), **data})
            try:
                if keep is not None:
                    keep(list(self._events))
            finally:  # closed even if storing failed: no reader is left waiting
                self._closed = True
                self._changed.notify_all()

    def follow(self, after: int | None) -> Iterator[str]:
        """The events after sequence number ``after`` (all when None) as SSE, waiting for each until the
        log is closed; an SSE comment every ``KEEP_ALIVE_S`` while none comes."""
        index = 0 if after is None else after + 1
        while True:
            with self._changed:
                if index >= len(self._events) and not self._closed:
                    self._changed.wait(KEEP_ALIVE_S)
                new, closed = self._events[index:], self._closed
            for payload in new:
                yield sse(payload)
            index += len(new)
            if closed:  # nothing is added once closed: ``new`` held the rest
                return
            if not new:
                yield ": keep-alive\n\n"


def replayed(body: dict[str, Any], events: list[dict[str, Any]] | None, after: int | None) -> Iterator[str]:
    """A background response's stream once it has ended, from its stored ``events``. One a stopped
    service cut short kept none: it is told as created and then as it ended (``response.failed``)."""
    if events is None:
        created = {**body, "status": "queued", "output": [], "error": None, "usage": None}
        events = [{"type": "response.created", "sequence_number": 0, "response": created}]
        if body["status"] in ("completed", "incomplete", "failed"):
            events.append({"type": f"response.{body['status']}", "sequence_number": 1, "response": body})
    for payload in events:
        if after is None or payload["sequence_number"] > after:
            yield sse(payload)
