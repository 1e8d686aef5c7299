"""A batch job (OpenAI's Batch API): the request lines of an uploaded file answered chunk by chunk on an
engine of the job's own, each answer appended to the job's output file.

A line gets the answer ``POST /v1/chat/completions``, ``/v1/completions`` or ``/v1/responses`` would give it
(``inference/answer.py``); single-choice lines to one model are generated together, left-padded
(``InferenceEngine.generate_together``): a greedy line gets the answer it gets alone, an unseeded
sampled one a draw at its own temperature and top-p (a seeded one is answered alone, so that its draws
repeat). A line the model can't answer (a prompt over its context, an Alpaca model asked a multi-turn
chat) goes to the error file with the status and error body the route would have sent, and the batch
goes on. Lines are flushed as written, so a job interrupted by a crash runs again from the requests it
has no line for (a line cut off mid-write is dropped and answered again). A cancel stops between
chunks; the lines written so far are the cancelled batch's files (``jobs/manager.py``). At the end of its
completion window (``BatchParams.expires_at``) a batch stops between chunks too: each request it has not
answered becomes an error line of code ``batch_expired``, as OpenAI writes them, and the batch ends
``expired`` (a batch still queued then is expired by the manager, with the same lines).

Why a job and not the API's engine: a batch of thousands of requests takes the same queue, concurrency
limit, crash recovery and cancel as the service's other long work, and never holds up interactive
requests on the API's single engine thread.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..api.inference.protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from ..api.responses.protocol import Response, ResponseRequest
from ..api.responses.service import chat_request, responded, response_param
from ..api.responses.truncation import fits, fitted
from ..errors import ServiceError, UserError
from ..inference.answer import answer, chat_renderer, completion_renderer, sampling_for
from ..inference.engine import InferenceEngine
from ..inference.spec import Choice, ModelSpec, Sampling
from ..store.ids import new_id
from .kinds import BatchParams

OUTPUT_FILE = "batch_output.jsonl"
ERROR_FILE = "batch_errors.jsonl"
PROGRESS_EVERY_S = 2.0
# The error line of a request a batch had no time for, as OpenAI writes it.
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
# Lines read, answered and written together: the plain ones to a model share one generate() call.
CHUNK_LINES = 32


def batch_files(output_dir: Path) -> tuple[Path, Path]:
    return output_dir / OUTPUT_FILE, output_dir / ERROR_FILE


def read_results(path: Path) -> tuple[list[str], dict[str, int]]:
    """The custom ids a results file holds and the prompt and generated tokens of its answers (OpenAI's
    batch ``usage``), after dropping a last line that a crash cut short."""
    tokens = {"input_tokens": 0, "output_tokens": 0}
    if not path.is_file():
        return [], tokens
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(whole))
    ids = []
    for line in whole.splitlines():
        row = json.loads(line)
        ids.append(row["custom_id"])
        for key, n in used(((row.get("response") or {}).get("body") or {}).get("usage")).items():
            tokens[key] += n
    return ids, tokens


def expire(handle: TextIO, lines: Iterable[dict[str, Any]]) -> int:
    """Write each of ``lines`` as a ``batch_expired`` error line; how many."""
    count = 0
    for line in lines:
        row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line["custom_id"], "response": None}
        handle.write(json.dumps({**row, "error": EXPIRED}) + "\n")
        count += 1
    handle.flush()
    return count


def used(usage: dict[str, Any] | None) -> dict[str, int]:
    """An answer's prompt and generated tokens, as a chat or completion (``prompt_tokens``) or a response
    (``input_tokens``) counts them."""
    usage = usage or {}
    return {
        "input_tokens": int(usage.get("prompt_tokens", usage.get("input_tokens", 0))),
        "output_tokens": int(usage.get("completion_tokens", usage.get("output_tokens", 0))),
    }


def request_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The input file's request objects (checked line by line when the batch was created)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def run_batch(p: BatchParams, specs: dict[str, ModelSpec], output_dir: Path, sink: Any, should_stop: Any, *,
              threads: int, model_cache_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """Answer every request of ``p``'s input with the models of ``specs`` (by model id).

    Returns ``expired: True`` when the window ended first (the rest are then ``batch_expired`` errors).

    Raises:
        JobStopped: ``should_stop()`` turned true between two chunks of requests.
    """
    from .worker import JobStopped

    output_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = batch_files(output_dir)
    (done_out, tokens), (done_err, _) = read_results(out_path), read_results(err_path)
    done = set(done_out) | set(done_err)
    counts = {"total": p.total, "completed": len(done_out), "failed": len(done_err)}
    if done:
        sink.message(f"resuming: {len(done)} of {p.total} requests already answered")
    engine = InferenceEngine(
        threads=threads, max_queue=0, max_models=max(1, len(specs)), model_cache_dir=model_cache_dir
    )
    answerer = Answerer(engine, specs, p.endpoint)
    last_report = time.monotonic()
    pending = (line for line in request_lines(Path(p.input_path)) if line["custom_id"] not in done)
    expired = False
    with out_path.open("a", encoding="utf-8") as out, err_path.open("a", encoding="utf-8") as err:
        while chunk := list(itertools.islice(pending, CHUNK_LINES)):
            if should_stop():
                raise JobStopped(f"cancelled after {counts['completed'] + counts['failed']} of {p.total} requests")
            if p.expires_at is not None and time.time() >= p.expires_at:
                answered = counts["completed"] + counts["failed"]
                counts["failed"] += expire(err, itertools.chain(chunk, pending))
                sink.message(f"the completion window ended: {answered} of {p.total} requests answered")
                expired = True
                break
            for custom_id, status, body in answerer.chunk(chunk):
                _write(out if status == 200 else err, custom_id, status, body)
                counts["completed" if status == 200 else "failed"] += 1
                for key, n in used(body.get("usage") if status == 200 else None).items():
                    tokens[key] += n
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                _report(sink, counts, tokens)
                last_report = time.monotonic()
    _report(sink, counts, tokens)
    # The counts and tokens of the result are the manager's, read from these files (jobs/manager.py).
    return {"output_path": str(out_path), "error_path": str(err_path), **({"expired": True} if expired else {})}


class Answerer:
    """Answers a chunk of request lines: plain requests to one model (``_together``) in one batched
    generation (``InferenceEngine.generate_together``), the rest one by one as the route does. A
    Responses line is answered as the chat request ``POST /v1/responses`` makes of it."""

    def __init__(self, engine: InferenceEngine, specs: dict[str, ModelSpec], endpoint: str = CHAT) -> None:
        """``endpoint``: the route whose requests the lines are (a Responses line is rendered as a chat)."""
        self.engine, self.specs = engine, specs
        self.responses, self.chat = endpoint == RESPONSES, endpoint in (CHAT, RESPONSES)
        self.kind, self.param = ("chat", "messages") if self.chat else ("completion", "prompt")

    def chunk(self, lines: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
        """``(custom_id, status, body)`` per line, in the lines' order."""
        results: dict[str, tuple[int, dict[str, Any]]] = {}
        together: dict[str, list[tuple[str, list[int], Sampling, _Body]]] = {}  # model -> its batched rows
        for line in lines:
            custom_id = line["custom_id"]
            try:
                req, body = self._request(line["body"])
                spec = self.specs[req.model]
                renders = self._renders(spec, req)
                if _together(req) and len(renders) == 1:
                    ids, context = self.engine.prepare(spec, renders[0])
                    sampling = sampling_for(req, len(ids), context, self.kind, self.param)
                    together.setdefault(req.model, []).append((custom_id, ids, sampling, body))
                    continue
                n_prompt, choices = 0, []
                for render in renders:  # OpenAI: choices of prompt i are indexed i*n .. i*n+n-1
                    n, these = answer(self.engine, spec, render, req, self.kind, self.param)
                    n_prompt, choices = n_prompt + n, [*choices, *these]
                results[custom_id] = (200, body(n_prompt, choices))
            except (ServiceError, UserError) as exc:
                results[custom_id] = self._failure(exc)
        for model, rows in together.items():
            try:
                choices = self.engine.generate_together(self.specs[model], [r[1] for r in rows], [r[2] for r in rows])
            except (ServiceError, UserError) as exc:
                results.update({custom_id: self._failure(exc) for custom_id, *_ in rows})
                continue
            for (custom_id, ids, _, body), choice in zip(rows, choices, strict=True):
                results[custom_id] = (200, body(len(ids), [choice]))
        return [(line["custom_id"], *results[line["custom_id"]]) for line in lines]

    def _request(self, body: dict[str, Any]) -> tuple[ChatCompletionRequest | CompletionRequest, _Body]:
        """A line's request (checked when the batch was created) and what makes its answer's body."""
        if self.responses:  # not stored: the batch's output file holds it
            asked = ResponseRequest.model_validate(body).model_copy(update={"store": False})
            turns = asked.messages()
            if asked.truncation == "auto":  # as the route fits them (api/responses/truncation.py)
                spec = self.specs[asked.model]

                def measure(candidate: list[dict[str, Any]]) -> bool:
                    chat = chat_request(asked, candidate)
                    ids, context = self.engine.prepare(spec, chat_renderer(spec, *chat.conversation()))
                    return fits(len(ids), context, asked.max_output_tokens)

                turns = fitted(turns, measure)
            chat = chat_request(asked, turns)
            begun = Response.begun(new_id("resp", "_"), asked)
            return chat, lambda n, choices: responded(begun, chat, n, choices[0])[0].model_dump()
        if self.chat:  # a line's tool calls are read as the route reads them
            req = ChatCompletionRequest.model_validate(body)
            return req, lambda n, choices: ChatCompletion.of(req.model, n, choices, req.call_parser).model_dump()
        plain = CompletionRequest.model_validate(body)
        return plain, lambda n, choices: Completion.of(plain.model, n, choices).model_dump()

    def _renders(self, spec: ModelSpec, req: Any) -> list[Callable[[Any], list[int]]]:
        if self.chat:
            return [chat_renderer(spec, *req.conversation())]
        return [completion_renderer(p) for p in req.prompts]

    def _failure(self, exc: ServiceError | UserError) -> tuple[int, dict[str, Any]]:
        if self.responses:  # the fields as the Responses request names them, as its route does
            exc.param = response_param(exc.param)
        return getattr(exc, "status_code", 400), _error_body(exc)


# Makes a line's answer body from its prompt's token count and its choices.
_Body = Callable[[int, list[Choice]], dict[str, Any]]


def _together(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether a request is answered in a batched generation: one choice of some tokens, greedy or
    unseeded (a seed's draws must repeat, and a batch draws for all its rows at once), no
    log-probabilities, echo, penalties or biases (``generate_together`` does none; it holds each row to
    its structured output or required call, and draws at its temperature and top-p); rows with images
    go together too, their images' inputs in row order (``inference/greedy.batch_media``)."""
    plain = req.scored is None and not getattr(req, "echo", False) and req.max_tokens != 0
    plain = plain and not (req.presence_penalty or req.frequency_penalty or req.biases)
    return plain and (req.temperature == 0 or req.seed is None) and req.n == 1


def _error_body(exc: ServiceError | UserError) -> dict[str, Any]:
    kind = getattr(exc, "type", "invalid_request_error")
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}


def _write(handle: TextIO, custom_id: str, status: int, body: dict[str, Any]) -> None:
    """One result line in OpenAI's batch output shape, flushed at once (what a crash leaves is whole lines)."""
    response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": None}
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def _report(sink: Any, counts: dict[str, int], tokens: dict[str, int]) -> None:
    answered_now = counts["completed"] + counts["failed"]
    sink.message(
        f"{answered_now} of {counts['total']} requests answered ({counts['failed']} failed)",
        data={"request_counts": dict(counts), "tokens": dict(tokens)},
    )
