"""Job kinds and what each one is given to run.

Every long operation is a job of some kind: the same queue, concurrency limit, events, log, cancel and
restart semantics (``jobs/manager.py``); only the payload differs. A fine-tune's payload is its resolved
``FinetuneConfig``; the others' are the small models below, resolved and checked by the API before the
job is queued (so a bad request is a 400 at once, not a failed job later). Torch-free: the API imports it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobKind = Literal["fine_tune", "extract", "merge", "sparsify", "evaluate", "batch", "eval_run"]
OPERATION_KINDS: tuple[str, ...] = ("extract", "merge", "sparsify", "evaluate")

# What events call a job of each kind ("Merge operation started").
DISPLAY_NAMES = {
    "fine_tune": "Fine-tuning job",
    "extract": "Extract operation",
    "merge": "Merge operation",
    "sparsify": "Sparsify operation",
    "evaluate": "Evaluate operation",
    "batch": "Batch",
    "eval_run": "Eval run",
}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ExtractParams(_Params):
    """Slice a named (or ``custom_config``) sub-adapter out of a job's NLS super-adapter."""

    fine_tuning_job_id: str
    version: str
    super_adapter: str
    output: str
    custom_config: list[int] | None = None


class MergeParams(_Params):
    """Merge an adapter (the job's, or one of its sub-adapters) into the base model."""

    fine_tuning_job_id: str
    version: str | None
    model: str
    adapter: str
    output: str
    sparse: bool
    gguf: str | None = None  # also write merged_model/model.gguf, other weights in this type


class SparsifyQuantization(_Params):
    """GPTQ of the pruned base (SQFT's INT base for QA-SparsePEFT); also the request's ``quantization``."""

    method: Literal["gptq"] = "gptq"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(64, ge=8, le=65536, multiple_of=8)  # 4-bit codes pack in pairs


class SparsifyParams(_Params):
    """Prune a base model into a model directory a job can train on."""

    model: str
    output: str
    method: Literal["magnitude", "wanda"]
    sparsity: float
    pattern: str | None = None
    calibration_path: str | None = None
    calibration_file: str | None = None
    n_calibration: int = 32
    quantization: SparsifyQuantization | None = None


class EvalCandidate(_Params):
    """One model to evaluate, resolved by the API: a base reference, or a fine-tune's adapter / merged model."""

    name: str  # as the client named it (echoed in the result)
    model: str  # a base model reference (checked again in the job) or a merged model's directory
    merged: bool = False
    tokenizer: str | None = None  # the job's General.tokenizer_name
    adapter: str | None = None  # a PEFT adapter directory
    sparse: bool = False  # the adapter was trained with SparsePEFT: evaluated merged with its mask
    data_format: str | None = None  # "alpaca" | "chat" as the job trained; None: a base model
    dataset: dict[str, Any] = {}  # the job's Dataset section (tokenization as in training); {}: defaults


class EvaluateParams(_Params):
    """Score candidate models on the same examples: an uploaded file, or a fine-tune's validation split."""

    candidates: list[EvalCandidate]
    data_path: str | None = None  # an uploaded file's records, or (None) the validation split below
    file: str | None = None
    fine_tuning_job_id: str | None = None
    # That job's validation examples, re-created as its recipe did: {"model", "tokenizer", "dataset", "seed"}.
    split: dict[str, Any] | None = None
    max_samples: int = 64
    generate: bool = True
    max_new_tokens: int = 64


class BatchModel(_Params):
    """A model that a batch's requests name, resolved by the API (``ModelService.spec``'s fields)."""

    model: str
    tokenizer: str | None = None
    adapter: str | None = None
    data_format: str | None = None
    sparse: bool = False
    merged: bool = False  # a fine-tune's merged model: its directory is the job's own, not under a root


class BatchParams(_Params):
    """Run an uploaded file of chat, completion or Responses requests (OpenAI's Batch API) on the embedded engine."""

    input_file_id: str
    input_path: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    total: int
    models: dict[str, BatchModel]  # every model id the requests name
    output_expires_after: int | None = None  # seconds: the output and error files expire that long after
    window_s: int = 24 * 3600  # its completion window: the batch expires that long after it was created
    expires_at: int | None = None  # when: set in the job's spec when it is launched (``batch_deadline``)


def batch_deadline(config: dict[str, Any], created_at: int) -> int:
    """When a batch's completion window ends (OpenAI's 24 hours for a batch stored before batches had one)."""
    return created_at + int(config.get("window_s", 24 * 3600))


class EvalRunParams(_Params):
    """Grade the rows of a data source (OpenAI's Evals API run), sampling a model first for ``completions``."""

    eval_id: str
    run_id: str  # the job's own id (each output item names it)
    name: str
    testing_criteria: list[dict[str, Any]]  # the eval's graders when the run was created
    data_source: dict[str, Any]  # as the client gave it (echoed by the run object)
    input_file_id: str | None = None  # a `file_id` source: the file's rows (checked when the run was created)
    input_path: str | None = None
    sampling: dict[str, Any] = {}  # a sampled run's sampling_params as chat/completions fields
    total: int
    models: dict[str, BatchModel]  # the sampled model and the model graders' models, by id


PARAMS: dict[str, type[_Params]] = {
    "extract": ExtractParams,
    "merge": MergeParams,
    "sparsify": SparsifyParams,
    "evaluate": EvaluateParams,
    "batch": BatchParams,
    "eval_run": EvalRunParams,
}
