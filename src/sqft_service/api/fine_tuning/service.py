"""Create, list, retrieve and cancel jobs; read their events and checkpoints."""

from __future__ import annotations

import secrets
from pathlib import Path

from ...config import FinetuneConfig, resolve_config
from ...errors import InvalidRequestError, NotFoundError
from ...jobs.manager import JobManager
from ...store.events import CheckpointRecord, EventRecord, EventStore
from ...store.ids import new_id
from ...store.jobs import FINE_TUNE, JobRecord, JobStore
from ..files.service import FileService
from .protocol import CreateFineTuningJobRequest


class FineTuningService:
    def __init__(self, jobs: JobStore, events: EventStore, files: FileService, manager: JobManager) -> None:
        self.jobs = jobs
        self.events = events
        self.files = files
        self.manager = manager

    def create(self, req: CreateFineTuningJobRequest) -> JobRecord:
        model = req.model or req.General.base_model
        if not model:
            raise InvalidRequestError("`model` is required (or give `General.base_model`)", param="model")
        training = self.files.resolve(req.training_file, "training_file")
        if training.purpose != "fine-tune":
            raise InvalidRequestError(
                f"file {training.id} has purpose '{training.purpose}', expected 'fine-tune'",
                param="training_file",
            )
        validation = None
        validation_ref = req.validation_file or req.Dataset.validation_file
        if validation_ref:
            validation = self.files.resolve(validation_ref, "validation_file")
        hyperparameters = req.hyperparameters
        if req.method is not None and req.method.supervised is not None and req.method.supervised.hyperparameters:
            hyperparameters = req.method.supervised.hyperparameters

        job_id = new_id("ftjob")
        workspace = self.manager.new_workspace(job_id)
        base = FinetuneConfig(General=req.General, Dataset=req.Dataset, Training=req.Training)
        seed = (
            req.seed
            if req.seed is not None
            else (req.Training.seed if req.Training.seed is not None else secrets.randbelow(2**31))
        )
        cfg = resolve_config(
            base,
            model=model,
            training_file_path=str(training.path),
            validation_file_path=str(validation.path) if validation else None,
            hyperparameters=hyperparameters,
            seed=seed,
        )
        # Outputs always live under the data dir: a client-chosen absolute path would let any
        # client write anywhere the service can.
        requested_output = cfg.General.output_dir
        cfg.General.output_dir = str(workspace.output.root)
        job = self.manager.create(
            job_id,
            FINE_TUNE,
            cfg.model_dump(mode="json"),
            model=model,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            seed=seed,
            suffix=req.suffix,
            metadata=req.metadata,
        )
        self.events.add_event(job_id, f"Created fine-tuning job: {job_id}")
        if requested_output:
            self.events.add_event(
                job_id,
                f"General.output_dir {requested_output!r} ignored: outputs are kept in {cfg.General.output_dir}",
                level="warn",
            )
        self.events.add_event(
            job_id,
            f"Validated training file: {training.filename} ({training.meta.get('n_records', '?')} records)",
        )
        self.manager.enqueue(job)
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id, kind=FINE_TUNE)
        if job is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return job

    def list(self, *, after: str | None, limit: int) -> tuple[list[JobRecord], bool]:
        return self.jobs.list(kinds=(FINE_TUNE,), after=after, limit=limit)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.is_final:
            raise InvalidRequestError(
                f"Job {job_id} has already {'been ' if job.status == 'cancelled' else ''}{job.status}; "
                "it cannot be cancelled",
                param="fine_tuning_job_id",
                code="job_not_cancellable",
            )
        return self.manager.cancel(job_id)

    def events_of(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[EventRecord], bool]:
        self.get(job_id)
        return self.events.list_events(job_id, after=after, limit=limit)

    def checkpoints_of(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[CheckpointRecord], bool]:
        self.get(job_id)
        return self.events.list_checkpoints(job_id, after=after, limit=limit)

    def log_path(self, job_id: str) -> Path:
        return JobManager.workspace(self.get(job_id)).log
