"""OpenAI's Graders API (``/v1/fine_tuning/alpha/graders``): check a grader, or grade one model sample
with it, before an eval or a fine-tune uses it. The graders are the Evals API's (``api/evals``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..evals.protocol import GraderOrMulti, check_grader_templates, refuse_unoffered

MAX_SAMPLE_CHARS = 1_000_000


class _GraderBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: GraderOrMulti

    @model_validator(mode="before")
    @classmethod
    def _offered(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unoffered(data.get("grader"), "grader")
        return data

    @model_validator(mode="after")
    def _templates(self) -> _GraderBody:
        check_grader_templates(self.grader, "grader")
        return self


class ValidateGraderRequest(_GraderBody):
    pass


class RunGraderRequest(_GraderBody):
    model_sample: str = Field(max_length=MAX_SAMPLE_CHARS)
    item: dict[str, Any] | None = None


class ValidateGraderResponse(BaseModel):
    grader: dict[str, Any]


class RunErrors(BaseModel):
    """OpenAI's error flags of a grader run; the ones this service can raise are set, the others stay
    false (no python graders run here)."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False


class RunMetadata(BaseModel):
    name: str
    type: str
    errors: RunErrors
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None = None
    sampled_model_name: str | None = None


class RunGraderResponse(BaseModel):
    reward: float
    metadata: RunMetadata
    sub_rewards: dict[str, Any] = {}
    model_grader_token_usage_per_model: dict[str, Any] = {}
