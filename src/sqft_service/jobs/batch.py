"""A batch job (OpenAI's Batch API): every request line of an uploaded file answered in turn on an engine
of the job's own, each answer appended to the job's output file as it comes.

A line is answered exactly as ``POST /v1/chat/completions`` or ``/v1/completions`` would answer it
(``inference/answer.py``); one the model can't answer (a prompt over its context, an Alpaca model asked
a multi-turn chat) goes to the error file with the status and error body the route would have sent, and
the batch goes on. Each line is flushed when written, so a job interrupted by a crash runs again from
the first request it has no line for (a line cut off mid-write is dropped and answered again). A cancel
stops between requests; the lines written so far are the cancelled batch's files (``jobs/manager.py``).

Why a job and not the API's engine: a batch of thousands of requests takes the same queue, concurrency
limit, crash recovery and cancel as the service's other long work, and never holds up interactive
requests on the API's single engine thread.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..api.inference.protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from ..errors import ServiceError, UserError
from ..inference.answer import answer, chat_renderer, completion_renderer
from ..inference.engine import InferenceEngine
from ..inference.spec import ModelSpec
from .kinds import BatchParams

OUTPUT_FILE = "batch_output.jsonl"
ERROR_FILE = "batch_errors.jsonl"
PROGRESS_EVERY_S = 2.0


def batch_files(output_dir: Path) -> tuple[Path, Path]:
    return output_dir / OUTPUT_FILE, output_dir / ERROR_FILE


def answered(path: Path) -> list[str]:
    """The custom ids a results file holds, after dropping a last line that a crash cut short."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(whole))
    return [json.loads(line)["custom_id"] for line in whole.splitlines() if line.strip()]


def request_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The input file's request objects (checked line by line when the batch was created)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def run_batch(p: BatchParams, specs: dict[str, ModelSpec], output_dir: Path, sink: Any, should_stop: Any, *,
              threads: int, model_cache_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """Answer every request of ``p``'s input with the models of ``specs`` (by model id).

    Raises:
        JobStopped: ``should_stop()`` turned true between two requests.
    """
    from .worker import JobStopped

    output_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = batch_files(output_dir)
    done_out, done_err = answered(out_path), answered(err_path)
    done = set(done_out) | set(done_err)
    counts = {"total": p.total, "completed": len(done_out), "failed": len(done_err)}
    if done:
        sink.message(f"resuming: {len(done)} of {p.total} requests already answered")
    engine = InferenceEngine(
        threads=threads, max_queue=0, max_models=max(1, len(specs)), model_cache_dir=model_cache_dir
    )
    chat = p.endpoint == "/v1/chat/completions"
    last_report = time.monotonic()
    with out_path.open("a", encoding="utf-8") as out, err_path.open("a", encoding="utf-8") as err:
        for line in request_lines(Path(p.input_path)):
            custom_id = line["custom_id"]
            if custom_id in done:
                continue
            if should_stop():
                raise JobStopped(f"cancelled after {counts['completed'] + counts['failed']} of {p.total} requests")
            try:
                body = _answer(engine, specs, line["body"], chat)
            except (ServiceError, UserError) as exc:
                _write(err, custom_id, getattr(exc, "status_code", 400), _error_body(exc))
                counts["failed"] += 1
            else:
                _write(out, custom_id, 200, body)
                counts["completed"] += 1
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                _report(sink, counts)
                last_report = time.monotonic()
    _report(sink, counts)
    return {"output_path": str(out_path), "error_path": str(err_path), "request_counts": counts}


def _answer(engine: InferenceEngine, specs: dict[str, ModelSpec], body: dict[str, Any], chat: bool) -> dict:
    if chat:
        req = ChatCompletionRequest.model_validate(body)
        spec = specs[req.model]
        render = chat_renderer(spec, [m.as_dict() for m in req.messages])
        n_prompt, choices = answer(engine, spec, render, req, "chat", "messages")
        return ChatCompletion.of(req.model, n_prompt, choices).model_dump()
    req_c = CompletionRequest.model_validate(body)
    spec = specs[req_c.model]
    n_prompt, choices = 0, []
    for prompt in [req_c.prompt] if isinstance(req_c.prompt, str) else req_c.prompt:
        n, these = answer(engine, spec, completion_renderer(prompt), req_c, "completion", "prompt")
        n_prompt, choices = n_prompt + n, [*choices, *these]
    return Completion.of(req_c.model, n_prompt, choices).model_dump()


def _error_body(exc: ServiceError | UserError) -> dict[str, Any]:
    kind = getattr(exc, "type", "invalid_request_error")
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}


def _write(handle: TextIO, custom_id: str, status: int, body: dict[str, Any]) -> None:
    """One result line in OpenAI's batch output shape, flushed at once (what a crash leaves is whole lines)."""
    response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": None}
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def _report(sink: Any, counts: dict[str, int]) -> None:
    answered_now = counts["completed"] + counts["failed"]
    sink.message(
        f"{answered_now} of {counts['total']} requests answered ({counts['failed']} failed)",
        data={"request_counts": dict(counts)},
    )
