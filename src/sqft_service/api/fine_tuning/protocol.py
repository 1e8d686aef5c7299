"""Fine-tuning request and response shapes: OpenAI's objects plus the reference service's sections."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...config import (
    MAX_DPO_BETA,
    MAX_PATH_CHARS,
    MAX_RL_GROUP,
    MAX_SEED,
    MAX_STEPS,
    AutoFloat,
    AutoInt,
    DatasetSection,
    GeneralSection,
    Hyperparameters,
    TrainingSection,
)
from ...job_secrets import redact
from ...store.events import CheckpointRecord, EventRecord
from ...store.jobs import JobRecord
from ..evals.protocol import GraderOrMulti, check_grader_templates, refuse_unoffered
from ..inference.protocol import ResponseFormat
from ..limits import Metadata


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


# Reinforcement fine-tuning's answers per prompt at `compute_multiplier` 1 (Training.rl_group_size's default).
RL_BASE_GROUP = 4


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters: the supervised ones plus ``compute_multiplier`` (answers
    sampled per prompt: 4 x the multiplier, at least 2), ``eval_interval`` (steps between validations:
    ``Training.eval_steps``) and ``eval_samples`` (answers per validation prompt: ``Training.rl_eval_samples``).
    ``reasoning_effort`` is "default" only: the models served here have no reasoning setting."""

    compute_multiplier: AutoFloat = "auto"
    eval_interval: AutoInt = "auto"
    eval_samples: AutoInt = "auto"
    reasoning_effort: str = "default"

    @field_validator("compute_multiplier", "eval_interval", "eval_samples", mode="before")
    @classmethod
    def _in_range(cls, v: Any, info: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        most = {"compute_multiplier": MAX_RL_GROUP / RL_BASE_GROUP, "eval_interval": MAX_STEPS}.get(
            info.field_name, MAX_RL_GROUP
        )
        if not (math.isfinite(v) and 0 < v <= most):
            raise ValueError(f"must be > 0 and at most {most:g}, or 'auto'")
        if info.field_name != "compute_multiplier" and v != int(v):
            raise ValueError("must be a whole number or 'auto'")
        return v

    @field_validator("reasoning_effort")
    @classmethod
    def _no_reasoning(cls, v: str) -> str:
        if v != "default":
            raise ValueError(f"'{v}' is not offered: the models trained here have no reasoning effort; use 'default'")
        return v

    @property
    def group_size(self) -> int | None:
        """Answers per prompt for ``compute_multiplier`` (None: "auto", ``Training.rl_group_size``)."""
        if self.compute_multiplier == "auto":
            return None
        return min(MAX_RL_GROUP, max(2, round(RL_BASE_GROUP * self.compute_multiplier)))


class ReinforcementMethod(BaseModel):
    """OpenAI's reinforcement method: a grader scores every sampled answer (``training/reinforcement.py``).

    The graders are the Evals API's (string_check, text_similarity, and label_model / score_model, whose
    judge runs in the job); templates read the prompt record's fields as ``item`` and the answer as
    ``sample.output_text``.
    """

    model_config = ConfigDict(extra="forbid")
    grader: GraderOrMulti
    hyperparameters: ReinforcementHyperparameters | None = None
    # The format every sampled answer is held to (chat's `response_format`): a grader then reads
    # `sample.output_json`, and no answer fails to parse unless it runs out of tokens.
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _offered(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unoffered(data.get("grader"), "method.reinforcement.grader")
        return data

    @model_validator(mode="after")
    def _templates(self) -> ReinforcementMethod:
        check_grader_templates(self.grader, "method.reinforcement.grader")
        return self


METHOD_TYPES = ("supervised", "dpo", "reinforcement")


class Method(BaseModel):
    """OpenAI's ``method``: supervised fine-tuning, Direct Preference Optimization (preference records) or
    reinforcement fine-tuning (prompt records and a grader)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        for other in METHOD_TYPES:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"`method.{other}` given with `method.type` {self.type!r}")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("`method.reinforcement` (its grader) is required with `method.type` 'reinforcement'")
        return self

    @property
    def hyperparameters(self) -> Hyperparameters | None:
        settings = getattr(self, self.type)
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
    if training.get("method") == "reinforcement":
        default = TrainingSection.model_fields
        group = training.get("rl_group_size", default["rl_group_size"].default)
        rl_hp = {
            **hp.model_dump(),
            "compute_multiplier": group / RL_BASE_GROUP,
            "eval_interval": training.get("eval_steps") or "auto",
            "eval_samples": training.get("rl_eval_samples") or "auto",
            "reasoning_effort": "default",
        }
        rl = {"grader": training.get("rl_grader"), "hyperparameters": rl_hp}
        if training.get("rl_response_format"):
            rl["response_format"] = training["rl_response_format"]
        return {"type": "reinforcement", "reinforcement": rl}
    return {"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}}
