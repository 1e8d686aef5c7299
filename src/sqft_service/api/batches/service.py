"""Batches (OpenAI's Batch API): a file of chat, completion or Responses requests answered by a job.

The input file is checked whole when the batch is created, line by line (JSON, ``custom_id``,
``method``, ``url``, a body the endpoint takes, a model the caller may use), so a bad file is a 400
naming its line rather than a batch that fails later; what only the model can tell (a prompt longer
than its context) is that request's line in the error file. The job (``jobs/batch.py``) shares the
queue, limits, cancel and crash recovery of every other job; its answers become files of purpose
``batch_output``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ...errors import InvalidRequestError, NotFoundError, ServiceError, UserError
from ...jobs.kinds import BatchModel, BatchParams
from ...jobs.manager import JobManager
from ...store.events import EventStore
from ...store.ids import new_id
from ...store.jobs import JobRecord, JobStore
from ..body import validation_error_to_service_error
from ..files.service import FileService
from ..inference.protocol import ChatCompletionRequest, CompletionRequest
from ..models.service import ModelService
from ..owner import current_owner, owned_by_caller
from ..responses.protocol import ResponseRequest
from ..responses.service import chat_request
from .protocol import CreateBatchRequest

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_REQUEST_TYPES = dict(zip(ENDPOINTS, (ChatCompletionRequest, CompletionRequest, ResponseRequest), strict=True))
# OpenAI's bound on one batch's requests; and the models one batch may name (each stays loaded in its job).
MAX_BATCH_REQUESTS = 50_000
MAX_BATCH_MODELS = 4
MAX_CUSTOM_ID_CHARS = 512
_LINE_KEYS = {"custom_id", "method", "url", "body"}


class BatchService:
    def __init__(
        self, jobs: JobStore, events: EventStore, files: FileService, manager: JobManager, models: ModelService
    ) -> None:
        # The completion window ("24h" to clients; SQFT_BATCH_WINDOW_S to an operator, or a test).
        self.window_s = max(1, round(manager.settings.batch_window_s))
        self.jobs = jobs
        self.events = events
        self.files = files
        self.manager = manager
        self.models = models

    def create(self, req: CreateBatchRequest) -> JobRecord:
        if req.completion_window != "24h":
            raise InvalidRequestError("`completion_window` must be '24h'", param="completion_window")
        if req.endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"'{req.endpoint[:128]}' is not a batch endpoint here; expected one of {', '.join(ENDPOINTS)}",
                param="endpoint",
            )
        try:
            file = self.files.get(req.input_file_id)
        except NotFoundError:
            raise NotFoundError(f"No such File object: {req.input_file_id}", param="input_file_id") from None
        if file.purpose != "batch":
            raise InvalidRequestError(
                f"File {file.id} was uploaded with purpose '{file.purpose}'; a batch reads a 'batch' file",
                param="input_file_id",
            )
        total, models = self._check_lines(file.path, req.endpoint)
        params = BatchParams(
            input_file_id=file.id,
            input_path=str(file.path),
            endpoint=req.endpoint,  # type: ignore[arg-type]
            total=total,
            models=models,
            output_expires_after=req.output_expires_after.seconds if req.output_expires_after else None,
            window_s=self.window_s,
        )
        batch_id = new_id("batch", "_")
        job = self.manager.create(
            batch_id, "batch", params.model_dump(mode="json"), metadata=req.metadata, owner=current_owner()
        )
        self.events.add_event(batch_id, f"Created batch: {batch_id} ({total} requests)")
        self.manager.enqueue(job)
        return self.get(batch_id)

    def _check_lines(self, path: Path, endpoint: str) -> tuple[int, dict[str, BatchModel]]:
        request_type = _REQUEST_TYPES[endpoint]
        seen: set[str] = set()
        models: dict[str, BatchModel] = {}
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                if len(seen) == MAX_BATCH_REQUESTS:
                    _refuse(number, f"a batch holds at most {MAX_BATCH_REQUESTS} requests")
                line = _json_object(number, raw)
                if unknown := sorted(set(line) - _LINE_KEYS):
                    _refuse(number, f"unknown key `{unknown[0][:64]}`; a request line has {sorted(_LINE_KEYS)}")
                custom_id = line.get("custom_id")
                if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
                    _refuse(number, f"`custom_id` must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
                if custom_id in seen:
                    _refuse(number, f"`custom_id` '{custom_id[:64]}' is used by an earlier line; each must be unique")
                seen.add(custom_id)
                if line.get("method") != "POST":
                    _refuse(number, "`method` must be 'POST'")
                if line.get("url") != endpoint:
                    _refuse(number, f"`url` must be the batch's endpoint '{endpoint}'")
                body = line.get("body")
                if not isinstance(body, dict):
                    _refuse(number, "`body` must be the request's JSON object")
                try:
                    request = request_type.model_validate(body)
                except ValidationError as exc:
                    error = validation_error_to_service_error(list(exc.errors()))
                    _refuse(number, f"`body`: {error.message}")
                if request.stream:
                    _refuse(number, "`body.stream`: a batch's answers are not streamed")
                if body.get("store") is True:  # (a response's `store` is true unless it says not)
                    _refuse(number, "`body.store`: a batch keeps its answers in its output file")
                if isinstance(request, ResponseRequest):
                    _responses_line(number, request)
                if request.model not in models:
                    if len(models) == MAX_BATCH_MODELS:
                        _refuse(number, f"a batch may name at most {MAX_BATCH_MODELS} models")
                    models[request.model] = self._model(number, request.model)
        if not seen:
            raise InvalidRequestError("the batch's input file has no requests", param="input_file_id")
        return len(seen), models

    def _model(self, number: int, model_id: str) -> BatchModel:
        try:
            return self.models.job_model(model_id)
        except ServiceError as exc:
            _refuse(number, f"`body.model`: {exc.message}")

    def get(self, batch_id: str) -> JobRecord:
        job = self.jobs.get(batch_id, kind="batch")
        if job is None or not owned_by_caller(job.owner):
            raise NotFoundError(f"No such batch: {batch_id}", param="batch_id")
        return job

    def list(self, *, after: str | None, limit: int) -> tuple[list[JobRecord], bool]:
        return self.jobs.list(kinds=("batch",), after=after, limit=limit, owner=current_owner())

    def cancel(self, batch_id: str) -> JobRecord:
        """Stop a batch between two requests; what it answered so far becomes its files."""
        job = self.get(batch_id)
        if job.is_final:
            raise InvalidRequestError(
                f"Batch {batch_id} has already {'been ' if job.status == 'cancelled' else ''}"
                f"{'completed' if job.status == 'succeeded' else job.status}; it cannot be cancelled",
                param="batch_id",
                code="batch_not_cancellable",
            )
        return self.manager.cancel(batch_id)

    def log_path(self, batch_id: str) -> Path:
        return self.manager.workspace(self.get(batch_id)).log

    def progress(self, job: JobRecord) -> tuple[dict[str, int], dict[str, int]]:
        """The request counts and tokens: the ended job's, or those its last progress event reported."""
        reported = job.result or self.events.latest_data(job.id, "request_counts") or {}
        counts, tokens = reported.get("request_counts"), reported.get("tokens")
        return (
            counts or {"total": int(job.config.get("total", 0)), "completed": 0, "failed": 0},
            tokens or {"input_tokens": 0, "output_tokens": 0},
        )


def _responses_line(number: int, request: ResponseRequest) -> None:
    """Refuse what a Responses line can't be answered with in a job (no stored responses there)."""
    if request.previous_response_id is not None:
        _refuse(number, "`body.previous_response_id`: a batch line can't continue a stored response; send "
                "the whole conversation as its `input`")  # fmt: skip
    if request.conversation is not None:
        _refuse(number, "`body.conversation`: a batch line can't read or add to a conversation; send the whole "
                "conversation as its `input`")  # fmt: skip
    try:
        chat_request(request, request.messages())
    except (ServiceError, UserError) as exc:
        _refuse(number, f"`body.{exc.param}`: {exc.message}" if exc.param else f"`body`: {exc.message}")


def _json_object(number: int, raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        _refuse(number, "not valid JSON")
    if not isinstance(line, dict):
        _refuse(number, "a request line is a JSON object")
    return line


def _refuse(number: int, message: str) -> Any:
    raise InvalidRequestError(f"line {number} of the input file: {message}", param="input_file_id")
