"""Extract sub-adapters, merge adapters, sparsify base models: each request becomes a job of that kind.

The request is checked here (the job exists and succeeded, the names are valid, the output is free), so
a bad request is a 400 at once; the work runs in a job process through the ``JobManager`` like a
fine-tune, with the same queue, events, log and cancel. :meth:`SqftService.wait` lets the reference's
routes answer with the result, as the reference does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ...errors import ConflictError, InvalidRequestError, NotFoundError, ServiceError
from ...jobs.kinds import OPERATION_KINDS, EvalCandidate, EvaluateParams, ExtractParams, MergeParams, SparsifyParams
from ...jobs.manager import JobManager
from ...model_access import ModelAccess
from ...model_names import parse_fine_tuned
from ...model_sources import NO_SOURCE_GGUF, export_source
from ...settings import Settings
from ...store.events import EventRecord, EventStore
from ...store.ids import new_id
from ...store.jobs import JobRecord, JobStore
from ...workspace import ELASTIC_CONFIG_FILE
from ..files.service import FileService
from ..fine_tuning.service import FineTuningService
from ..owner import current_owner, owned_by_caller
from .protocol import EvaluateRequest, SparsifyRequest, version_name_problem


def check_version_name(version: str, param: str) -> str:
    """The request models check this already; again here for callers that build no request model."""
    if problem := version_name_problem(version, param):
        raise InvalidRequestError(problem, param=param)
    return version


# Evaluate jobs score reference replies; reinforcement prompts have none (their grader's Evals do).
PROMPTS_UNSCORED = (
    "prompt records, which have no reference replies to score: evaluate on Alpaca, chat or preference "
    "records, or grade a model's answers to the prompts with the Evals API (/v1/evals)"
)


class SqftService:
    def __init__(
        self,
        settings: Settings,
        fine_tuning: FineTuningService,
        files: FileService,
        jobs: JobStore,
        events: EventStore,
        manager: JobManager,
    ) -> None:
        self.settings = settings
        self.fine_tuning = fine_tuning
        self.files = files
        self.jobs = jobs
        self.events = events
        self.manager = manager

    # ------------------------------------------------------------- requests
    def _succeeded_job(self, job_id: str) -> JobRecord:
        job = self.fine_tuning.get(job_id)
        if job.status != "succeeded":
            raise ConflictError(
                f"Job {job_id} is {job.status}; its adapter is available once the job has succeeded",
                param="fine_tuning_job_id",
                code="job_not_succeeded",
            )
        return job

    @staticmethod
    def _lora(job: JobRecord) -> dict[str, Any]:
        return job.config.get("General", {}).get("lora_config", {})

    def extract(self, job_id: str, version: str, custom_config: list[int] | None) -> JobRecord:
        version = check_version_name(version, "sub_adapter_version")
        job = self._succeeded_job(job_id)
        super_adapter = self.manager.workspace(job).output.adapter
        if not self._lora(job).get("neural_lora_search") or not (super_adapter / ELASTIC_CONFIG_FILE).is_file():
            raise InvalidRequestError(
                f"Job {job_id} did not train an elastic super-adapter: extraction needs "
                "`General.lora_config.neural_lora_search: true`",
                param="fine_tuning_job_id",
            )
        params = ExtractParams(
            fine_tuning_job_id=job_id,
            version=version,
            super_adapter=str(super_adapter),
            output=str(self.manager.workspace(job).output.sub_adapter(version)),
            custom_config=custom_config,
        )
        return self._submit("extract", params, model=job.model, parent=job_id)

    def merge(self, job_id: str, version: str | None, gguf: str | None = None) -> JobRecord:
        job = self._succeeded_job(job_id)
        if gguf is not None and export_source(job.base_model) is None:
            raise InvalidRequestError(f"`gguf`: {NO_SOURCE_GGUF}", param="gguf")
        outputs = self.manager.workspace(job).output
        if version is not None:
            check_version_name(version, "adapter_version")
            adapter_dir = outputs.sub_adapter(version)
            if not (adapter_dir / "adapter_config.json").is_file():
                raise InvalidRequestError(
                    f"Job {job_id} has no sub-adapter {version!r}: extract it first with /v1/finetune/extract_adapter",
                    param="adapter_version",
                )
        else:
            adapter_dir = outputs.adapter
        params = MergeParams(
            fine_tuning_job_id=job_id,
            version=version,
            model=job.base_model,
            adapter=str(adapter_dir),
            output=str(outputs.merged_model(version)),
            sparse=bool(self._lora(job).get("sparse_adapter")),
            gguf=gguf,
        )
        return self._submit("merge", params, model=job.model, parent=job_id)

    def sparsify(self, body: SparsifyRequest) -> JobRecord:
        ModelAccess.from_settings(self.settings).check_model(body.model, "model")
        name = body.output_name or new_id("sparse")
        target = (self.settings.model_cache_dir / "sparse" / name).resolve()
        claimed = any(op.config.get("output") == str(target) for op in self.jobs.active_of_kind("sparsify"))
        if target.exists() or claimed:
            raise ConflictError(f"a sparse model named {name!r} already exists at {target}", param="output_name")
        calibration = self.files.resolve(body.calibration_file, "calibration_file") if body.calibration_file else None
        params = SparsifyParams(
            model=body.model,
            output=str(target),
            method=body.method,
            sparsity=body.sparsity,
            pattern=body.pattern,
            calibration_path=str(calibration.path) if calibration else None,
            calibration_file=calibration.id if calibration else None,
            n_calibration=body.n_calibration,
            quantization=body.quantization,
        )
        return self._submit("sparsify", params, model=body.model)

    def evaluate(self, body: EvaluateRequest, models: Any) -> JobRecord:
        """``models``: the app's ModelService, which resolves ``ft:`` ids (another project's are a 404)."""
        access = ModelAccess.from_settings(self.settings)
        candidates = []
        for ref in body.candidates:
            if parse_fine_tuned(ref) is None:
                access.check_model(ref, "candidates")
                candidates.append(EvalCandidate(name=ref, model=ref))
                continue
            entry = models.get(ref, "candidates")
            job = entry.job
            spec = models.spec(ref, "candidates")
            candidates.append(
                EvalCandidate(
                    name=ref,
                    model=spec.model if entry.ref.merged else job.base_model,
                    merged=entry.ref.merged,
                    tokenizer=None if entry.ref.merged else spec.tokenizer,
                    adapter=spec.adapter,
                    sparse=spec.sparse,
                    data_format=spec.data_format,
                    dataset=job.config.get("Dataset", {}),
                )
            )
        data = self.files.resolve(body.file, "file") if body.file is not None else None
        if data is not None and data.meta.get("format") == "prompt":
            raise InvalidRequestError(f"file {data.id} holds {PROMPTS_UNSCORED}", param="file")
        split = None
        if body.fine_tuning_job_id is not None:
            job = self._succeeded_job(body.fine_tuning_job_id)
            if job.config.get("Training", {}).get("method") == "reinforcement":
                raise InvalidRequestError(f"job {job.id} trained on {PROMPTS_UNSCORED}", param="fine_tuning_job_id")
            dataset = job.config.get("Dataset", {})
            sources = [dataset.get("validation_file") or dataset.get("train_file")]
            if not all(src and Path(src).is_file() for src in sources):
                raise InvalidRequestError(
                    f"Job {job.id}'s training data is gone (its file was deleted): evaluate on a `file`",
                    param="fine_tuning_job_id",
                )
            ModelAccess.for_stored_models(self.settings).check_model(job.base_model, "fine_tuning_job_id")
            split = {
                "model": job.base_model,
                "tokenizer": job.config.get("General", {}).get("tokenizer_name"),
                "dataset": dataset,
                "seed": job.config.get("Training", {}).get("seed"),
            }
        params = EvaluateParams(
            candidates=candidates,
            data_path=str(data.path) if data else None,
            file=data.id if data else None,
            fine_tuning_job_id=body.fine_tuning_job_id,
            split=split,
            max_samples=body.max_samples,
            generate=body.generate,
            max_new_tokens=body.max_new_tokens,
        )
        return self._submit("evaluate", params, model=None, parent=body.fine_tuning_job_id)

    def _submit(self, kind: str, params: BaseModel, *, model: str | None, parent: str | None = None) -> JobRecord:
        op_id = new_id("op")
        job = self.manager.create(
            op_id, kind, params.model_dump(mode="json"), model=model, parent_job_id=parent, owner=current_owner()
        )
        self.events.add_event(op_id, f"Created {kind} operation: {op_id}")
        self.manager.enqueue(job)
        return self.get(op_id)

    # ----------------------------------------------------------- operations
    def get(self, op_id: str) -> JobRecord:
        job = self.jobs.get(op_id)
        # Another project's operation is a 404, like a missing one.
        if job is None or job.kind not in OPERATION_KINDS or not owned_by_caller(job.owner):
            raise NotFoundError(f"No such operation: {op_id}", param="operation_id")
        return job

    def list(self, *, kind: str | None, after: str | None, limit: int) -> tuple[list[JobRecord], bool]:
        kinds = (kind,) if kind else OPERATION_KINDS
        return self.jobs.list(kinds=kinds, after=after, limit=limit, owner=current_owner())

    def cancel(self, op_id: str) -> JobRecord:
        op = self.get(op_id)
        if op.is_final:
            raise InvalidRequestError(
                f"Operation {op_id} has already {'been ' if op.status == 'cancelled' else ''}{op.status}; "
                "it cannot be cancelled",
                param="operation_id",
                code="operation_not_cancellable",
            )
        return self.manager.cancel(op_id)

    def events_of(self, op_id: str, *, after: str | None, limit: int) -> tuple[list[EventRecord], bool]:
        self.get(op_id)
        return self.events.list_events(op_id, after=after, limit=limit)

    def log_path(self, op_id: str) -> Path:
        return self.manager.workspace(self.get(op_id)).log

    async def wait(self, op_id: str, is_disconnected: Any = None) -> JobRecord:
        """The operation once it has ended, or as it is after ``settings.operation_wait_s`` (or a disconnect)."""
        deadline = time.monotonic() + self.settings.operation_wait_s
        delay = 0.05
        while True:
            op = self.get(op_id)
            if op.is_final or time.monotonic() >= deadline:
                return op
            if is_disconnected is not None and await is_disconnected():
                return op
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    @staticmethod
    def result_of(op: JobRecord) -> dict[str, Any]:
        """A finished operation's result, or its failure as the error the reference route answers with."""
        if op.status == "succeeded" and op.result is not None:
            return op.result
        if op.status == "cancelled":
            raise ConflictError(f"Operation {op.id} was cancelled", param="operation_id", code="operation_cancelled")
        error = op.error or {}
        message = error.get("message") or f"operation {op.id} failed"
        if error.get("user_error"):
            raise InvalidRequestError(message, param=error.get("param"), code=error.get("code"))
        raise ServiceError(message, code=error.get("code"))
