"""What a job process runs for each job kind. Heavy imports (torch, transformers) happen here, inside
the job process, never in the service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..training.events import EventSink
from ..workspace import JobWorkspace
from .kinds import ExtractParams, MergeParams, SparsifyParams


@dataclass
class TaskContext:
    workspace: JobWorkspace
    sink: EventSink
    should_stop: Callable[[], bool]
    model_cache_dir: Path | None


def fine_tune(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from ..config import FinetuneConfig
    from ..training.recipe import run_training

    cfg = FinetuneConfig.model_validate(params)
    result = run_training(
        cfg, ctx.workspace.output.root, ctx.sink, model_cache_dir=ctx.model_cache_dir, should_stop=ctx.should_stop
    )
    return {
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "adapter_dir": result.adapter_dir,
        "metrics_csv": result.metrics_csv,
    }


def extract(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .. import model_ops

    p = ExtractParams.model_validate(params)
    try:
        ranks = model_ops.sub_adapter_ranks(Path(p.super_adapter), p.version, p.custom_config)
    except ValueError as exc:
        raise UserError(str(exc), param="custom_config") from None
    ctx.sink.message(f"extracting sub-adapter {p.version!r} (ranks {ranks}) from {p.super_adapter}")
    summary = model_ops.extract(Path(p.super_adapter), Path(p.output), ranks)
    return {
        "fine_tuning_job_id": p.fine_tuning_job_id,
        "adapter_version": p.version,
        "ranks": summary["ranks"],
        "path": summary["path"],
        "n_params": summary.get("n_params"),
        "dimensions": summary.get("dimensions", []),
    }


def merge(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .. import model_ops

    p = MergeParams.model_validate(params)
    ctx.sink.message(f"merging {p.adapter} into {p.model}{' (SparsePEFT: zeros kept)' if p.sparse else ''}")
    report = model_ops.merge(
        p.model, Path(p.adapter), Path(p.output), sparse=p.sparse, model_cache_dir=ctx.model_cache_dir
    )
    return {
        "fine_tuning_job_id": p.fine_tuning_job_id,
        "adapter_version": p.version,
        "path": report["path"],
        "sparse": p.sparse,
        "dtype": report.get("dtype"),
        "zeros_preserved": report.get("zeros_preserved"),
        "sparsity": {"before": report.get("before"), "after": report.get("after")},
    }


def sparsify(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .. import model_ops

    p = SparsifyParams.model_validate(params)
    ctx.sink.message(f"sparsifying {p.model}: {p.method}, sparsity {p.sparsity}{f', {p.pattern}' if p.pattern else ''}")
    return model_ops.sparsify(
        p.model,
        Path(p.output),
        method=p.method,
        sparsity=p.sparsity,
        pattern=p.pattern,
        calibration_file=p.calibration_path,
        calibration_label=p.calibration_file,
        n_calibration=p.n_calibration,
        model_cache_dir=ctx.model_cache_dir,
    )


TASKS: dict[str, Callable[[dict[str, Any], TaskContext], dict[str, Any]]] = {
    "fine_tune": fine_tune,
    "extract": extract,
    "merge": merge,
    "sparsify": sparsify,
}
# Kinds whose task polls ``should_stop`` between steps; the others stop at once on SIGTERM.
COOPERATIVE_STOP = {"fine_tune"}
