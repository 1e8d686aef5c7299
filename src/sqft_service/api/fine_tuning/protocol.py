"""Fine-tuning request and response shapes: OpenAI's objects plus the reference service's sections."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ...config import (
    MAX_DPO_BETA,
    MAX_PATH_CHARS,
    MAX_SEED,
    AutoFloat,
    DatasetSection,
    GeneralSection,
    Hyperparameters,
    TrainingSection,
)
from ...job_secrets import redact
from ...store.events import CheckpointRecord, EventRecord
from ...store.jobs import JobRecord
from ..limits import check_metadata

# OpenAI's metadata rules, checked before the type so that every violation names `metadata`.
Metadata = Annotated[dict[str, str], BeforeValidator(check_metadata)]


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones plus ``beta`` ("auto": ``Training.dpo_beta``)."""

    beta: AutoFloat = "auto"

    @field_validator("beta", mode="before")
    @classmethod
    def _beta_in_range(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        if not (math.isfinite(v) and 0 < v <= MAX_DPO_BETA):
            raise ValueError(f"must be > 0 and at most {MAX_DPO_BETA:g}, or 'auto'")
        return v


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's ``method``: supervised fine-tuning or Direct Preference Optimization (preference records)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"`method.{other}` given with `method.type` {self.type!r}")
        return self

    @property
    def hyperparameters(self) -> Hyperparameters | None:
        settings = self.dpo if self.type == "dpo" else self.supervised
        return settings.hyperparameters if settings is not None else None


class CreateFineTuningJobRequest(BaseModel):
    """OpenAI's create-job body, extended with the reference's ``General`` / ``Dataset`` / ``Training``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(None, max_length=MAX_PATH_CHARS)
    training_file: str = Field(max_length=MAX_PATH_CHARS)
    validation_file: str | None = Field(None, max_length=MAX_PATH_CHARS)
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: Metadata | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = Field(None, max_length=16)
    General: GeneralSection = Field(default_factory=GeneralSection)
    Dataset: DatasetSection = Field(default_factory=DatasetSection)
    Training: TrainingSection = Field(default_factory=TrainingSection)


class JobIdRequest(BaseModel):
    """The reference service's ``{"fine_tuning_job_id": ...}`` body."""

    model_config = ConfigDict(extra="forbid")
    fine_tuning_job_id: str


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str = "org-local"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    integrations: list[dict[str, Any]] | None = None
    estimated_finish: int | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None
    # Extensions: what actually ran, and where it went.
    started_at: int | None = None
    output_dir: str | None = None
    # `fine_tuned_model` is the model's name (ft:...); this is where its adapter lies (stock PEFT format).
    fine_tuned_model_path: str | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, job: JobRecord) -> FineTuningJob:
        training = job.config.get("Training", {})
        base_lr = TrainingSection.model_fields["learning_rate"].default
        hp = JobHyperparameters(
            n_epochs=training.get("epochs", 1),
            batch_size=training.get("batch_size", 2),
            learning_rate_multiplier=round(training.get("learning_rate", base_lr) / base_lr, 8),
        )
        return cls(
            id=job.id,
            created_at=job.created_at,
            error=JobError(**job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=job.finished_at,
            hyperparameters=hp,
            model=job.model,
            result_files=list(job.result_files),
            seed=job.seed,
            status=job.status,  # type: ignore[arg-type]
            trained_tokens=job.trained_tokens,
            training_file=job.training_file,
            validation_file=job.validation_file,
            integrations=[],
            estimated_finish=job.estimated_finish if job.status == "running" else None,
            metadata=job.metadata,
            method=_method(training, hp),
            user_provided_suffix=job.suffix,
            started_at=job.started_at,
            output_dir=job.config.get("General", {}).get("output_dir"),
            fine_tuned_model_path=(job.result or {}).get("adapter_dir") if job.fine_tuned_model else None,
            # Secrets are "***" in what the API returns, whatever the row holds (older rows held them).
            config=redact(job.config),
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, e: EventRecord) -> JobEvent:
        return cls(
            id=e.id,
            created_at=e.created_at,
            level=e.level,
            message=e.message,
            type=e.type,
            data=e.data,  # type: ignore[arg-type]
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
    # Extension: the checkpoint as a model (`ft:…:ckpt-step-<N>`; the final one's is the job's model), for
    # /v1/chat/completions, evaluate and /v1/models once the job has succeeded. `fine_tuned_model_checkpoint`
    # stays the directory, as the reference service answers.
    model: str | None = None

    @classmethod
    def from_record(cls, c: CheckpointRecord, model: str | None = None) -> JobCheckpoint:
        known = set(CheckpointMetrics.model_fields)
        return cls(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=c.path,
            fine_tuning_job_id=c.job_id,
            metrics=CheckpointMetrics(**{k: v for k, v in c.metrics.items() if k in known}),
            step_number=c.step,
            model=model,
        )


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def _method(training: dict[str, Any], hp: JobHyperparameters) -> dict[str, Any]:
    """OpenAI's ``method`` of a job, from what its configuration trains."""
    if training.get("method") == "dpo":
        beta = training.get("dpo_beta", TrainingSection.model_fields["dpo_beta"].default)
        return {"type": "dpo", "dpo": {"hyperparameters": {**hp.model_dump(), "beta": beta}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}}
