"""Bodies of the SQFT routes (reference names: ``sub_adapter_version``, ``custom_config``) and the
operation object that every extract / merge / sparsify request becomes.

``wait`` (extension, default true as the reference behaves): answer with the result once the operation
has ended; false answers ``202`` with the operation at once (``Prefer: respond-async`` does the same).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ...jobs.kinds import SparsifyQuantization
from ...model_names import CHECKPOINT_PREFIX
from ...model_sources import GGUFType
from ...store.jobs import JobRecord
from ...workspace import TrainingOutputs
from ..fine_tuning.protocol import JobError

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# A sub-adapter is the directory output/<version>: it must not land on what the fine-tune wrote there.
# "merged" too: model ids end in `:<version>` or `:merged` (model_names.py), so a version so named would be ambiguous.
RESERVED_VERSIONS = TrainingOutputs.reserved_names() | {"merged"}


def version_name_problem(version: str, param: str) -> str | None:
    """Why ``version`` cannot name a sub-adapter directory (the message names ``param``), or None."""
    if not _VERSION_RE.match(version):
        return (
            f"`{param}` {version!r} is not a valid name: use letters, digits, '-' and '_' only "
            "(it becomes a directory under the job's output)"
        )
    if version.casefold() in {name.casefold() for name in RESERVED_VERSIONS}:
        taken = ", ".join(sorted(RESERVED_VERSIONS))
        return f"`{param}` {version!r} is reserved: the job's output uses these names ({taken}); choose another"
    if version.casefold().startswith(CHECKPOINT_PREFIX):
        return f"`{param}` {version!r} is reserved: model ids of checkpoints end in `:{CHECKPOINT_PREFIX}<step>`"
    return None


def _check_version(version: str | None, info: ValidationInfo) -> str | None:
    # A field validator, so the error names the field the client sent (adapter_version or sub_adapter_version).
    if version is not None and (problem := version_name_problem(version, str(info.field_name))):
        raise ValueError(problem)
    return version


class ExtractAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fine_tuning_job_id: str
    sub_adapter_version: str | None = None
    adapter_version: str | None = None
    custom_config: list[int] | None = None
    wait: bool = True

    _versions = field_validator("sub_adapter_version", "adapter_version")(_check_version)

    @model_validator(mode="after")
    def _one_version(self) -> ExtractAdapterRequest:
        if self.sub_adapter_version is None:
            self.sub_adapter_version = self.adapter_version or "heuristic"
        return self


class MergeAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fine_tuning_job_id: str
    adapter_version: str | None = None
    sub_adapter_version: str | None = None
    # Extension: also write merged_model/model.gguf (llama.cpp, Ollama), other weights in this type
    # (f32 … q4_0; with 4/5 bits the embedding and head in q8_0); QA-SparsePEFT layers go as their trained
    # integers (Q4_1 / Q5_1 / Q8_0 blocks).
    gguf: GGUFType | None = None
    wait: bool = True

    _versions = field_validator("adapter_version", "sub_adapter_version")(_check_version)

    @property
    def version(self) -> str | None:
        return self.adapter_version or self.sub_adapter_version


class SparsifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    method: Literal["magnitude", "wanda"] = "magnitude"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    pattern: str | None = Field(None, pattern=r"^[1-9][0-9]{0,3}:[1-9][0-9]{0,3}$")
    calibration_file: str | None = None
    n_calibration: int = Field(32, ge=1, le=1024)
    # Extension: also quantize the pruned base by GPTQ (on the same calibration text as Wanda).
    quantization: SparsifyQuantization | None = None
    output_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    wait: bool = True

    @field_validator("pattern")
    @classmethod
    def _n_below_m(cls, pattern: str | None) -> str | None:
        # Whether M divides the layers' widths depends on the model: the job checks that (a 400 too).
        if pattern is not None:
            n, m = (int(v) for v in pattern.split(":"))
            if n >= m:
                raise ValueError(f"`pattern` {pattern!r} keeps N of every M weights: it needs N < M (e.g. '2:4')")
        return pattern


class EvaluateRequest(BaseModel):
    """``candidates``: base model references or fine-tuned ids (``ft:…``); the records every candidate is
    scored on (the first ``max_samples``): ``file`` (an uploaded Alpaca or chat file) or
    ``fine_tuning_job_id`` (that job's validation examples, as its training held them out)."""

    model_config = ConfigDict(extra="forbid")
    candidates: list[str] = Field(..., min_length=1, max_length=8)
    file: str | None = None
    fine_tuning_job_id: str | None = None
    max_samples: int = Field(64, ge=1, le=1024)
    generate: bool = True
    max_new_tokens: int = Field(64, ge=1, le=1024)
    wait: bool = True

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        if any(not c for c in candidates):
            raise ValueError("`candidates` holds an empty model reference")
        if len(set(candidates)) != len(candidates):
            raise ValueError("`candidates` names a model more than once")
        return candidates

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateRequest:
        if (self.file is None) == (self.fine_tuning_job_id is None):
            raise ValueError(
                "give exactly one of `file` (an uploaded file) and `fine_tuning_job_id` (its validation split)"
            )
        return self


class EvaluationSample(BaseModel):
    prompt: str
    reference: str
    output: str


class CandidateScore(BaseModel):
    candidate: str
    loss: float | None
    perplexity: float | None
    token_accuracy: float | None
    exact_match: float | None = None
    contains_match: float | None = None
    n_examples: int
    n_label_tokens: int = 0
    # Preference records only: the share of pairs whose preferred reply the candidate finds likelier,
    # and the mean log-probability margin (preferred minus other reply).
    preference_accuracy: float | None = None
    preference_margin: float | None = None
    samples: list[EvaluationSample] = Field(default_factory=list)


class Evaluation(BaseModel):
    object: Literal["finetune.evaluation"] = "finetune.evaluation"
    file: str | None = None
    fine_tuning_job_id: str | None = None
    max_samples: int
    generate: bool
    data: list[CandidateScore]


class SubAdapter(BaseModel):
    object: Literal["fine_tuning.sub_adapter"] = "fine_tuning.sub_adapter"
    fine_tuning_job_id: str
    adapter_version: str
    ranks: list[int]
    path: str
    n_params: int | None = None
    dimensions: list[dict[str, Any]] = Field(default_factory=list)


class MergedModel(BaseModel):
    object: Literal["fine_tuning.merged_model"] = "fine_tuning.merged_model"
    fine_tuning_job_id: str
    adapter_version: str | None
    path: str
    sparse: bool
    dtype: str | None = None
    zeros_preserved: bool | None = None
    sparsity: dict[str, Any]
    # QA-SparsePEFT: bits, group_size, layers and the file of integer weights beside the model.
    quantization: dict[str, Any] | None = None
    # With `gguf`: path, bytes, tensor_types, int_layers and exact_int_layers of merged_model/model.gguf.
    gguf: dict[str, Any] | None = None


class QuantizedBase(BaseModel):
    """What GPTQ did to a pruned base (``SparsifyRequest.quantization``)."""

    method: Literal["gptq"]
    bits: int
    group_size: int
    layers: int
    # ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs, the mean over the quantized layers: GPTQ's
    # and what round-to-nearest would have left on the same layers.
    output_error: float
    rtn_output_error: float
    overall_zeros_after_rounding: float  # the INT model's zero fraction (kept weights can round to 0)
    file: str  # beside the weights: the scales, zero points and float weights QA-SparsePEFT trains from


class SparseModel(BaseModel):
    object: Literal["sparse_model"] = "sparse_model"
    path: str
    source_model: str
    method: str
    sparsity: float
    pattern: str | None
    calibration: str | None
    report: dict[str, Any]
    quantization: QuantizedBase | None = None


class Operation(BaseModel):
    """An extract, merge, sparsify or evaluate request as a job: its state, then its result or error."""

    id: str
    object: Literal["finetune.operation"] = "finetune.operation"
    kind: Literal["extract", "merge", "sparsify", "evaluate"]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    fine_tuning_job_id: str | None = None
    model: str | None = None
    params: dict[str, Any]
    result: dict[str, Any] | None = None
    error: JobError | None = None

    @classmethod
    def from_record(cls, op: JobRecord) -> Operation:
        return cls(
            id=op.id,
            kind=op.kind,  # type: ignore[arg-type]
            status=op.status,  # type: ignore[arg-type]
            created_at=op.created_at,
            started_at=op.started_at,
            finished_at=op.finished_at,
            fine_tuning_job_id=op.parent_job_id,
            model=op.model,
            params=op.config,
            result=op.result,
            error=JobError(**op.error) if op.error else None,
        )


class OperationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Operation]
    has_more: bool = False
