"""Evals (OpenAI's Evals API): an eval holds the rows' JSON schema and its graders; a run grades a data
source's rows, sampling one of the caller's models first (``completions``) or reading each row's own
sample (``jsonl``), as a job of kind ``eval_run`` (``jobs/eval_run.py``) with the queue, limits, cancel
and crash recovery of every other job.

Everything a run could fail on that can be known up front is a 400 when it is created, naming the field
or the file's line: a row that does not fit the eval's schema, a model the caller may not use, a
template that reads a field the data source's rows cannot have is found per row (that row errors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from jsonschema import SchemaError, validators
from pydantic import ValidationError

from ...errors import ConflictError, InvalidRequestError, NotFoundError
from ...graders import check_template, template_names
from ...jobs.eval_run import output_path
from ...jobs.kinds import BatchModel, EvalRunParams
from ...jobs.manager import JobManager
from ...store.chat_completions import ChatCompletionStore, StoredCompletion
from ...store.evals import EvalRecord, EvalStore
from ...store.events import EventStore
from ...store.ids import new_id
from ...store.jobs import JobRecord, JobStore
from ..body import validation_error_to_service_error
from ..files.service import FileService
from ..inference.protocol import ChatCompletionRequest
from ..models.service import ModelService
from ..owner import current_owner, owned_by_caller
from .items import RunItems
from .protocol import (
    MODEL_GRADERS,
    SAMPLE_SCHEMA,
    STORED_ITEM_SCHEMA,
    CompletionsDataSource,
    CreateEvalRequest,
    CreateRunRequest,
    CustomDataSourceConfig,
    FileIdSource,
    OutputItemList,
    ResponsesDataSource,
    RunObject,
    StoredCompletionsSource,
    UpdateEvalRequest,
    content_templates,
)

STORED_ROWS = "stored_rows.jsonl"  # a stored_completions source's rows, as selected when the run was created
MAX_RUN_ROWS = 50_000  # OpenAI's bound on a batch's requests; a run's rows are as many requests
KIND = "eval_run"
# Job statuses as OpenAI's run statuses.
RUN_STATUS = {
    "validating_files": "queued",
    "queued": "queued",
    "paused": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "canceled",
}


class EvalService:
    def __init__(
        self,
        evals: EvalStore,
        jobs: JobStore,
        events: EventStore,
        files: FileService,
        manager: JobManager,
        models: ModelService,
        stored: ChatCompletionStore,
    ) -> None:
        self.evals, self.jobs, self.events, self.stored = evals, jobs, events, stored
        self.files, self.manager, self.models = files, manager, models
        self.items = RunItems()

    # ------------------------------------------------------------ evals
    def create(self, req: CreateEvalRequest) -> EvalRecord:
        source = req.data_source_config
        if isinstance(source, CustomDataSourceConfig):
            _check_schema(source.item_schema, "data_source_config.item_schema")
            properties: dict[str, Any] = {"item": source.item_schema}
            if source.include_sample_schema:
                properties["sample"] = SAMPLE_SCHEMA
            config: dict[str, Any] = {"type": "custom"}
        else:  # a stored completion's row, and its own answer as the sample
            properties = {"item": STORED_ITEM_SCHEMA, "sample": SAMPLE_SCHEMA}
            config = {"type": source.type, "metadata": source.metadata}
        for i, grader in enumerate(req.testing_criteria):
            if grader.type in MODEL_GRADERS:
                self.models.spec(grader.model, f"testing_criteria[{i}].model")
        config["schema"] = {"type": "object", "properties": properties, "required": [*properties]}
        criteria = [g.model_dump(mode="json", exclude_none=True) for g in req.testing_criteria]
        eval_id = new_id("eval", "_")
        name = req.name or f"eval {eval_id[-8:]}"
        return self.evals.create(eval_id, name, config, criteria, req.metadata, current_owner())

    def get(self, eval_id: str) -> EvalRecord:
        record = self.evals.get(eval_id)
        if record is None or not owned_by_caller(record.owner):
            raise NotFoundError(f"No such eval: {eval_id}", param="eval_id")
        return record

    def list(self, *, after: str | None, limit: int, order: str, order_by: str) -> tuple[list[EvalRecord], bool]:
        descending, by_update = order == "desc", order_by != "created_at"
        return self.evals.list(
            owner=current_owner(), after=after, limit=limit, descending=descending, by_update=by_update
        )

    def update(self, eval_id: str, req: UpdateEvalRequest) -> EvalRecord:
        self.get(eval_id)
        self.evals.update(eval_id, name=req.name, metadata=req.metadata)
        return self.get(eval_id)

    def delete(self, eval_id: str) -> None:
        """Delete an eval and its runs (refused while a run has not ended: cancel it first)."""
        self.get(eval_id)
        runs = self._runs_of(eval_id)
        if going := [r.id for r in runs if not r.is_final]:
            raise ConflictError(
                f"eval {eval_id} has runs that have not ended ({', '.join(going[:8])}); cancel them first",
                param="eval_id",
                code="eval_in_use",
            )
        for run in runs:
            self._forget(run)
        self.evals.delete(eval_id)

    # ------------------------------------------------------------ runs
    def create_run(self, eval_id: str, req: CreateRunRequest) -> JobRecord:
        record = self.get(eval_id)
        ds = req.data_source
        run_id = new_id("evalrun", "_")
        reads_sample = _reads(record.testing_criteria, "sample")
        file_id = file_path = None
        models: dict[str, BatchModel] = {}
        sampled = isinstance(ds, CompletionsDataSource | ResponsesDataSource) and ds.model is not None
        if sampled:
            models[ds.model] = self.models.job_model(ds.model, "data_source.model")
            self._check_sampling(ds)
        if isinstance(ds.source, FileIdSource):
            file = self._file(ds.source.id)
            file_id, file_path = file.id, str(file.path)
            lines = ((f"line {n} of the file", "data_source.source.id", row) for n, row in _file_rows(file.path))
            total = self._check_rows(record, lines, ds.type == "jsonl" and reads_sample)
        elif isinstance(ds.source, StoredCompletionsSource):
            rows = self._stored_rows(ds.source, record)
            found = ((f"stored completion {row['item']['id']}", "data_source.source", row) for row in rows)
            total = self._check_rows(record, found, False)
            file_path = str(self.manager.new_workspace(run_id).root / STORED_ROWS)  # written once all is checked
        else:
            at = "data_source.source.content"
            given = (
                (f"{at}[{n}]", f"{at}[{n}]", r.model_dump(exclude_none=True)) for n, r in enumerate(ds.source.content)
            )
            total = self._check_rows(record, given, ds.type == "jsonl" and reads_sample)
        for i, grader in enumerate(record.testing_criteria):  # checked again: a model may have gone since
            if grader["type"] in MODEL_GRADERS and grader["model"] not in models:
                models[grader["model"]] = self.models.job_model(grader["model"], f"testing_criteria[{i}].model")
        params = EvalRunParams(
            eval_id=eval_id,
            run_id=run_id,
            name=req.name or f"{getattr(ds, 'model', None) or ds.type} run {run_id[-8:]}"[:256],
            testing_criteria=record.testing_criteria,
            data_source=ds.model_dump(mode="json", exclude_none=True),
            input_file_id=file_id,
            input_path=file_path,
            sampling=ds.chat_sampling() if sampled else {},
            total=total,
            models=models,
        )
        if isinstance(ds.source, StoredCompletionsSource):  # the selection is fixed now, as the run's own file
            path = Path(file_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        try:
            job = self.manager.create(
                run_id, KIND, params.model_dump(mode="json"), metadata=req.metadata, owner=current_owner()
            )
        except BaseException:  # refused (the project's unfinished jobs): nothing of the run stays
            shutil.rmtree(self.manager.new_workspace(run_id).root, ignore_errors=True)
            raise
        self.events.add_event(run_id, f"Created eval run: {run_id} ({total} rows)")
        self.manager.enqueue(job)
        return self.run(eval_id, run_id)

    def _check_sampling(self, ds: CompletionsDataSource | ResponsesDataSource) -> None:
        if ds.input_messages is not None and ds.input_messages.type == "template":
            for j, message in enumerate(ds.input_messages.template):
                for where, text in content_templates(message.content):
                    param = f"data_source.input_messages.template[{j}].content{where}"
                    check_template(text, param)
                    if "sample" in template_names(text):
                        raise InvalidRequestError("the messages a model is asked can't read `sample`", param=param)
        try:  # checked as chat/completions checks them: a schema or tool it can't hold is a 400 now
            ChatCompletionRequest.model_validate(
                {"model": ds.model, "messages": [{"role": "user", "content": "-"}], **ds.chat_sampling()}
            )
        except ValidationError as exc:
            error = validation_error_to_service_error(list(exc.errors()))
            at = "data_source.sampling_params" + (f".{error.param}" if error.param else "")
            raise InvalidRequestError(error.message, param=at) from None

    def _file(self, file_id: str) -> Any:
        try:
            file = self.files.get(file_id)
        except NotFoundError:
            raise NotFoundError(f"No such File object: {file_id}", param="data_source.source.id") from None
        if file.purpose != "evals":
            raise InvalidRequestError(
                f"File {file.id} was uploaded with purpose '{file.purpose}'; a run reads an 'evals' file",
                param="data_source.source.id",
            )
        return file

    def _stored_rows(self, source: StoredCompletionsSource, record: EvalRecord) -> list[dict[str, Any]]:
        """The stored completions a source selects, oldest first, as rows with their own answer as sample."""
        metadata = source.metadata if source.metadata is not None else record.data_source_config.get("metadata")
        found, _ = self.stored.list(
            owner=current_owner(),
            limit=min(source.limit or MAX_RUN_ROWS, MAX_RUN_ROWS),
            model=source.model,
            metadata=metadata or None,
            created_after=source.created_after,
            created_before=source.created_before,
        )
        if not found:
            raise InvalidRequestError("no stored chat completions match the source", param="data_source.source")
        return [stored_row(c) for c in found]

    def _check_rows(self, record: EvalRecord, rows: Any, needs_sample: bool) -> int:
        """How many rows there are, each checked against the eval's item schema (400 naming the first bad
        one). ``rows``: ``(where, param, row)``, where the row is said to be and the field that holds it."""
        schema = record.data_source_config["schema"]["properties"]["item"]
        validator = validators.validator_for(schema)(schema)
        total = 0
        for where, param, row in rows:
            if total == MAX_RUN_ROWS:
                raise InvalidRequestError(f"a run holds at most {MAX_RUN_ROWS} rows", param=param)
            if not isinstance(row, dict) or not isinstance(row.get("item"), dict):
                raise InvalidRequestError(f"{where}: a row is an object with an `item` object", param=param)
            if unknown := sorted(set(row) - {"item", "sample"}):
                raise InvalidRequestError(f"{where}: unknown key `{unknown[0][:64]}`", param=param)
            if (error := next(validator.iter_errors(row["item"]), None)) is not None:
                at = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
                raise InvalidRequestError(
                    f"{where}: `item{at}` does not fit the eval's item schema: {error.message[:300]}", param=param
                )
            if needs_sample and not isinstance(row.get("sample"), dict):
                raise InvalidRequestError(
                    f"{where}: the graders read `sample`, and a jsonl row is graded on its own `sample` object",
                    param=param,
                )
            total += 1
        if not total:
            raise InvalidRequestError("the data source has no rows", param="data_source.source")
        return total

    def run(self, eval_id: str, run_id: str) -> JobRecord:
        job = self.jobs.get(run_id, kind=KIND)
        if job is None or job.config.get("eval_id") != eval_id or not owned_by_caller(job.owner):
            raise NotFoundError(f"No such run: {run_id} of eval {eval_id}", param="run_id")
        return job

    def list_runs(
        self, eval_id: str, *, after: str | None, limit: int, order: str, status: str | None
    ) -> tuple[list[JobRecord], bool]:
        self.get(eval_id)
        statuses = tuple(s for s, run in RUN_STATUS.items() if run == status) if status else None
        return self.jobs.list(
            kinds=(KIND,),
            after=after,
            limit=limit,
            owner=current_owner(),
            config={"eval_id": eval_id},
            statuses=statuses,
            descending=order == "desc",
        )

    def cancel_run(self, eval_id: str, run_id: str) -> JobRecord:
        job = self.run(eval_id, run_id)
        if job.is_final:
            raise InvalidRequestError(
                f"run {run_id} has already ended ({RUN_STATUS[job.status]}); it cannot be cancelled",
                param="run_id",
                code="run_not_cancellable",
            )
        self.manager.cancel(run_id)
        return self.run(eval_id, run_id)

    def delete_run(self, eval_id: str, run_id: str) -> None:
        job = self.run(eval_id, run_id)
        if not job.is_final:
            raise ConflictError(f"run {run_id} has not ended; cancel it first", param="run_id", code="run_in_progress")
        self._forget(job)

    def _runs_of(self, eval_id: str) -> list[JobRecord]:
        runs, after = [], None
        while True:
            page, more = self.jobs.list(kinds=(KIND,), after=after, limit=100, config={"eval_id": eval_id})
            runs += page
            if not more:
                return runs
            after = page[-1].id

    def _forget(self, job: JobRecord) -> None:
        if self.jobs.delete(job.id):
            self.items.forget(self._items_path(job))
            shutil.rmtree(self.manager.workspace(job).root, ignore_errors=True)

    # ------------------------------------------------------------ what a run shows
    def run_object(self, job: JobRecord) -> RunObject:
        names = [g["name"] for g in job.config["testing_criteria"]]
        summary = self.items.summary(self._items_path(job), names, job.config["total"])
        error = job.error or {}
        return RunObject(
            id=job.id,
            eval_id=job.config["eval_id"],
            name=job.config["name"],
            status=RUN_STATUS.get(job.status, "in_progress"),  # type: ignore[arg-type]
            model=job.config["data_source"].get("model"),
            data_source=job.config["data_source"],
            created_at=job.created_at,
            report_url=f"/v1/evals/{job.config['eval_id']}/runs/{job.id}/output_items",
            **summary,
            error={"code": error.get("code") or "run_failed", "message": error.get("message", "")}
            if job.status == "failed"
            else None,
            metadata=job.metadata,
        )

    def output_items(
        self, eval_id: str, run_id: str, *, after: str | None, limit: int, order: str, status: str | None
    ) -> OutputItemList:
        path = self._items_path(self.run(eval_id, run_id))
        page, more = self.items.page(path, after=after, limit=limit, descending=order == "desc", status=status)
        return OutputItemList(
            data=page,
            has_more=more,
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
        )

    def output_item(self, eval_id: str, run_id: str, item_id: str) -> dict[str, Any]:
        item = self.items.get(self._items_path(self.run(eval_id, run_id)), item_id)
        if item is None:
            raise NotFoundError(f"No such output item: {item_id} of run {run_id}", param="output_item_id")
        return item

    def _items_path(self, job: JobRecord) -> Path:
        return output_path(self.manager.workspace(job).output.root)


def _check_schema(schema: dict[str, Any], param: str) -> None:
    if schema.get("type") != "object":
        raise InvalidRequestError('the item schema describes an object (`"type": "object"`)', param=param)
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(f"not a valid JSON schema: {exc.message[:300]}", param=param) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"not a valid JSON schema: {exc}"[:300], param=param) from None


def _reads(criteria: list[dict[str, Any]], name: str) -> bool:
    """Whether any template of these graders reads ``name`` (``item`` or ``sample``)."""
    texts = []
    for grader in criteria:
        for key in ("input", "reference"):
            value = grader.get(key)
            texts += (
                [value]
                if isinstance(value, str)
                else [t for m in value or [] for _, t in content_templates(m["content"])]
            )
    return any(name in template_names(text) for text in texts)


def _file_rows(path: Path) -> Any:
    """``(line number, row)`` of an uploaded evals file (a line that is not JSON: a 400 naming it)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except (ValueError, RecursionError):
                raise InvalidRequestError(
                    f"line {number} of the file: not valid JSON", param="data_source.source.id"
                ) from None


def stored_row(c: StoredCompletion) -> dict[str, Any]:
    """A stored chat completion as an eval row: its request and answer as ``item``, the completion as
    ``sample`` (graded as it is when the run names no model)."""
    message = (c.response.get("choices") or [{}])[0].get("message") or {}
    item = {
        "id": c.id,
        "model": c.model,
        "created_at": c.created_at,
        "input": c.request.get("messages", []),
        **({"tools": c.request["tools"]} if c.request.get("tools") else {}),
        "output": message.get("content"),
        "metadata": c.metadata,
    }
    sample = {"model": c.model, "choices": c.response.get("choices", []), "usage": c.response.get("usage")}
    return {"item": item, "sample": sample}
