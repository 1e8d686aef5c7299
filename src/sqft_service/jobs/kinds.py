"""Job kinds and what each one is given to run.

Every long operation is a job of some kind: the same queue, concurrency limit, events, log, cancel and
restart semantics (``jobs/manager.py``); only the payload differs. A fine-tune's payload is its resolved
``FinetuneConfig``; the others' are the small models below, resolved and checked by the API before the
job is queued (so a bad request is a 400 at once, not a failed job later). Torch-free: the API imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

JobKind = Literal["fine_tune", "extract", "merge", "sparsify"]
OPERATION_KINDS: tuple[str, ...] = ("extract", "merge", "sparsify")

# What events call a job of each kind ("Merge operation started").
DISPLAY_NAMES = {
    "fine_tune": "Fine-tuning job",
    "extract": "Extract operation",
    "merge": "Merge operation",
    "sparsify": "Sparsify operation",
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


PARAMS: dict[str, type[_Params]] = {"extract": ExtractParams, "merge": MergeParams, "sparsify": SparsifyParams}
