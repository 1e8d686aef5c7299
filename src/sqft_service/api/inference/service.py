"""Chat completions and completions on the embedded engine (``inference/engine.py``).

A request resolves its model (404 naming ``model`` if the caller has none such), takes an engine slot
(429 when the queue is full), then runs on the engine's worker thread: the event loop only awaits.
A streamed request loads its model and renders its prompt first, so that those errors are still a
plain 4xx; once the event stream has begun, an error is sent as a last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ...errors import InvalidRequestError, ServiceError
from ...inference.answer import answer, chat_renderer, completion_renderer, sampling_for
from ...inference.engine import InferenceEngine, drain
from ...inference.spec import Choice, ModelSpec
from ...settings import Settings
from ...store.chat_completions import ChatCompletionStore
from ...tool_calls import CallParser, HeldStream, finish_reason, new_call_id
from ..models.service import ModelService
from ..owner import current_owner
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
    _Sampling,
    chat_chunk,
    completion_chunk,
)


class EngineBusyError(ServiceError):
    status_code = 429
    type = "server_busy"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "engine_overloaded") -> None:
        super().__init__(message, param=param, code=code)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class InferenceService:
    def __init__(self, settings: Settings, models: ModelService, stored: ChatCompletionStore | None = None) -> None:
        self.settings = settings
        self.models = models
        self.stored = stored  # where `store: true` keeps a chat completion (None: not offered)
        self._engine: InferenceEngine | None = None
        self._lock = threading.Lock()
        models.on_delete = self._forget

    @property
    def engine(self) -> InferenceEngine:
        with self._lock:  # created on the first request: a service that never infers starts no thread
            if self._engine is None:
                s = self.settings
                self._engine = InferenceEngine(
                    threads=s.inference_threads,
                    max_queue=s.inference_queue,
                    max_models=s.inference_max_models,
                    model_cache_dir=s.model_cache_dir,
                    device=s.inference_device,
                    dtype=s.inference_dtype,
                )
            return self._engine

    @property
    def created_engine(self) -> InferenceEngine | None:
        """The engine if a request has created it (``/metrics`` reads it without creating one)."""
        return self._engine

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()

    def _forget(self, path: Path) -> None:
        if self._engine is not None:  # queued behind any running generation; not awaited
            self._engine.submit(self._engine.forget, path)

    # ------------------------------------------------------------ plumbing
    def _reserve(self) -> InferenceEngine:
        engine = self.engine
        if not engine.reserve():
            raise EngineBusyError(
                f"the inference queue is full ({self.settings.inference_queue} requests wait); retry shortly"
            )
        return engine

    @staticmethod
    def _submit(engine: InferenceEngine, fn: Callable[..., Any], *args: Any, release: bool) -> Future:
        try:
            future = engine.submit(fn, *args)
        except RuntimeError:  # shutting down
            engine.release()
            raise
        if release:  # when the work ends, not when the client stops waiting for it
            future.add_done_callback(lambda _: engine.release())
        return future

    async def prepared(self, model: str, render: Callable[[ModelSpec], Callable[[Any], Any]]) -> tuple[Any, int]:
        """``render(spec)`` applied to the tokenizer of the caller's ``model``, and the model's context length
        (``/tokenize`` and ``/detokenize``: the tokenizer is loaded with the model, on the engine's worker)."""
        spec = await self._spec(model)
        engine = self._reserve()
        return await asyncio.wrap_future(self._submit(engine, engine.prepare, spec, render(spec), release=True))

    async def _spec(self, model: str) -> ModelSpec:
        return await asyncio.to_thread(self.models.spec, model)  # store and file reads, off the event loop

    # ------------------------------------------------------------ routes
    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | Iterator[str]:
        if req.store and self.stored is None:
            raise InvalidRequestError("this service keeps no chat completions", param="store")
        if req.stream:
            spec = await self._spec(req.model)
            render = chat_renderer(spec, *req.conversation())
            keep = self._keeper(req) if req.store else None
            return await self._stream(req, spec, [render], "chat", "messages", keep)
        n_prompt, choices = await self.chat_answer(req)
        completion = ChatCompletion.of(req.model, n_prompt, choices, req.call_parser)
        if req.store:
            await asyncio.to_thread(self._keeper(req), completion)
        return completion

    def _keeper(self, req: ChatCompletionRequest) -> Callable[[ChatCompletion], None]:
        """What stores a completion of ``req`` for the caller (taken now: a stream ends outside the request)."""
        owner, store = current_owner(), self.stored
        assert store is not None

        def keep(completion: ChatCompletion) -> None:
            store.put(completion.model_dump(mode="json"), req.stored_request(), req.metadata, owner)

        return keep

    async def complete(self, req: CompletionRequest) -> Completion | Iterator[str]:
        spec = await self._spec(req.model)
        renders = [completion_renderer(p) for p in req.prompts]
        if req.stream:
            return await self._stream(req, spec, renders, "completion", "prompt")
        n_prompt, choices = 0, []
        for render in renders:  # OpenAI: choices of prompt i are indexed i*n .. i*n+n-1
            engine = self._reserve()
            future = self._submit(engine, answer, engine, spec, render, req, "completion", "prompt", release=True)
            n, these = await asyncio.wrap_future(future)
            n_prompt, choices = n_prompt + n, [*choices, *these]
        return Completion.of(req.model, n_prompt, choices)

    async def chat_answer(self, req: ChatCompletionRequest) -> tuple[int, list[Choice]]:
        """A chat request's prompt tokens and choices (the Responses API answers with them)."""
        spec = await self._spec(req.model)
        render = chat_renderer(spec, *req.conversation())
        engine = self._reserve()
        future = self._submit(engine, answer, engine, spec, render, req, "chat", "messages", release=True)
        return await asyncio.wrap_future(future)

    async def chat_stream(self, req: ChatCompletionRequest) -> tuple[int, queue.Queue, threading.Event]:
        """A chat request's generation started: its prompt tokens, the sink ``InferenceEngine.stream``
        fills, and the event that stops it (the Responses API streams its own events from them)."""
        spec = await self._spec(req.model)
        render = chat_renderer(spec, *req.conversation())
        n_prompt, sinks, cancel = await self._start(req, spec, [render], "chat", "messages")
        return n_prompt, sinks[0], cancel

    async def _stream(
        self, req: _Sampling, spec: ModelSpec, renders: list, kind: str, param: str, keep: Any = None
    ) -> Iterator[str]:
        n_prompt, sinks, cancel = await self._start(req, spec, renders, kind, param)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        scored = getattr(req, "scored", None) is not None
        parser = getattr(req, "call_parser", None)
        return self._events(req.model, kind, req.n, n_prompt, sinks, cancel, include_usage, scored, parser, keep)

    async def _start(
        self, req: _Sampling, spec: ModelSpec, renders: list, kind: str, param: str
    ) -> tuple[int, list[queue.Queue], threading.Event]:
        """Start streaming: every prompt is rendered and checked first (so a bad one is still a 4xx),
        then one generation per prompt is queued, in order, each on its own sink."""
        engine = self._reserve()
        cancel = threading.Event()
        try:
            prepared = []
            for render in renders:
                ids, context = await asyncio.wrap_future(engine.submit(engine.prepare, spec, render))
                prepared.append((ids, sampling := sampling_for(req, len(ids), context, kind, param)))
            if sampling.logit_bias:  # the same for every prompt: its token ids checked before the stream
                await asyncio.wrap_future(engine.submit(engine.check, spec, sampling))
            sinks: list[queue.Queue] = []
            for ids, sampling in prepared:
                sinks.append(sink := queue.Queue())
                last = engine.submit(engine.stream, spec, ids, sampling, sink, cancel)
        except BaseException:
            cancel.set()
            engine.release()
            raise
        # One slot for the whole request; the single worker runs the generations in order, so the
        # last one ends last. Released when the work ends, not when the client stops reading.
        last.add_done_callback(lambda _: engine.release())
        return sum(len(ids) for ids, _ in prepared), sinks, cancel

    @staticmethod
    def _events(
        model: str,
        kind: str,
        n: int,
        n_prompt: int,
        sinks: list[queue.Queue],
        cancel: threading.Event,
        usage: bool,
        scored: bool,
        parser: CallParser | None = None,
        keep: Callable[[ChatCompletion], None] | None = None,
    ) -> Iterator[str]:
        """The SSE body (iterated by Starlette in a worker thread, so blocking on the queue is fine).

        As OpenAI streams ``n`` choices: every chunk carries one choice, told apart by its ``index``; the
        chunks of different choices interleave as they are generated; each choice ends with its own chunk
        holding its ``finish_reason``; the usage chunk (if asked) counts all of them. A list of prompts
        (completions) is generated prompt after prompt; prompt ``p``'s choice ``i`` has index ``p * n + i``,
        as in the non-streamed answer, and its choices finish before the next prompt's begin. With
        log-probabilities, a chunk carries those of the tokens decoded since the previous one (text held
        back, as a piece of a stop string, is sent with its tokens later), a completion's offsets counted
        in the choice's text sent so far. With tools, a choice's text is sent while it cannot be a call;
        from a call's start it is held, and at the end its calls are sent whole, in one chunk with what
        was held (``tool_calls.HeldStream``), and the choice finishes with ``tool_calls`` (``length`` if
        ``max_tokens`` cut it: ``tool_calls.finish_reason``). With ``keep`` (``store: true``), the whole
        completion, under the stream's id, is stored once the last choice has ended.
        """
        cid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        sent: dict[int, int] = {}  # a completion choice's characters sent: its next token's text offset

        held: dict[int, HeldStream] = {}  # with tools: each choice's answer
        waiting: dict[int, list] = {}  # with tools and log-probabilities: the scores of held text

        def chunk(
            index: int,
            text: str | None,
            finish: str | None = None,
            role: bool = False,
            scores: list | None = None,
            calls: list[dict[str, str]] | None = None,
        ) -> dict[str, Any]:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                if calls:
                    delta["tool_calls"] = [
                        {"index": k, "id": new_call_id(), "type": "function", "function": call}
                        for k, call in enumerate(calls)
                    ]
                logprobs = ChatLogprobs.of(scores) if scored and scores is not None else None
                return chat_chunk(cid, created, model, index, delta, finish, logprobs)
            logprobs = CompletionLogprobs.of(scores, sent.get(index, 0)) if scored and scores is not None else None
            sent[index] = sent.get(index, 0) + len(text or "")
            return completion_chunk(cid, created, model, index, text or "", finish, logprobs)

        try:
            if kind == "chat":  # each choice's first chunk names the role, as OpenAI's do
                for index in range(n):
                    yield _sse(chunk(index, None, role=True))
            choices: list[Choice] = []
            for prompt_index, sink in enumerate(sinks):
                offset, final = prompt_index * n, None
                for item in drain(sink):
                    if isinstance(item, Exception):
                        error = {"message": str(item) or type(item).__name__, "type": "server_error", "param": None}
                        yield _sse({"error": {**error, "code": getattr(item, "code", None)}})
                        return
                    if isinstance(item, list):
                        final = item
                        continue
                    index, piece, scores = item
                    at = offset + index
                    if parser is not None:
                        waiting.setdefault(at, []).extend(scores or ())
                        if not (piece := held.setdefault(at, HeldStream(parser)).push(piece)):
                            continue
                        scores, waiting[at] = (waiting[at] if scored else None), []
                    yield _sse(chunk(at, piece, scores=scores))
                assert final is not None
                for at, choice in enumerate(final, start=offset):
                    finish = choice.finish_reason
                    if parser is not None:
                        text, calls = held.get(at, HeldStream(parser)).finish()
                        scores = waiting.pop(at, [])
                        if text or calls or (scored and scores):
                            yield _sse(chunk(at, text or None, scores=scores if scored else None, calls=calls))
                        finish = finish_reason(calls, finish)
                    yield _sse(chunk(at, None, finish))
                choices += final
            if keep is not None:
                kept = ChatCompletion.of(model, n_prompt, choices, parser).model_copy(
                    update={"id": cid, "created": created}
                )
                keep(kept)
            if usage:
                body = chunk(0, None)
                body.update(choices=[], usage=Usage.of(n_prompt, choices).model_dump())
                yield _sse(body)
            yield _sse("[DONE]")
        finally:
            cancel.set()  # the client left, or the stream ended: stop generating either way
