"""What a job process runs for each job kind. Heavy imports (torch, transformers) happen here, inside
the job process, never in the service."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..graders import judge_models
from ..job_secrets import restore_secrets
from ..model_access import ModelAccess
from ..model_sources import NO_SOURCE_GGUF, GGUFExportError, export_source
from ..training.events import EventSink
from ..workspace import JobWorkspace
from .kinds import BatchModel, BatchParams, EvalRunParams, EvaluateParams, ExtractParams, MergeParams, SparsifyParams

if TYPE_CHECKING:
    from ..config import ParentModel


@dataclass
class TaskContext:
    workspace: JobWorkspace
    sink: EventSink
    should_stop: Callable[[], bool]
    model_cache_dir: Path | None


def _model_access(ctx: TaskContext) -> ModelAccess:
    """The service's model policy, handed over by the manager in the job's environment."""
    return ModelAccess.from_job_environment(os.environ, ctx.model_cache_dir)


def fine_tune(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from ..config import FinetuneConfig
    from ..training.recipe import run_training

    # The stored config shows secrets as "***"; the real values are only in the workspace's secrets file.
    cfg = FinetuneConfig.model_validate(restore_secrets(params, ctx.workspace.secrets))
    general = cfg.General
    if general.parent is not None:
        _merge_parent(general.parent, Path(general.base_model or ""), ctx)
    # Load the real paths checked now, not the names checked at request time (see model_access.py).
    general.base_model, general.tokenizer_name = _model_access(ctx).check_fine_tune(
        general.base_model or "", general.tokenizer_name, general.config.trust_remote_code
    )
    interval = os.environ.get("SQFT_CHECKPOINT_INTERVAL_S")
    judge = cfg.Training.rl_judge
    judges = {}
    if judge is not None:  # a reinforcement job's model grader: its judge's real paths checked now too
        (name,) = judge_models(cfg.Training.rl_grader or {})  # the API allows one judge model a job
        judges = _specs({name: BatchModel(**judge)}, _model_access(ctx))
    result = run_training(
        cfg,
        ctx.workspace.output.root,
        ctx.sink,
        model_cache_dir=ctx.model_cache_dir,
        should_stop=ctx.should_stop,
        resume_every_s=float(interval) if interval else None,
        judges=judges,
    )
    return {
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "adapter_dir": result.adapter_dir,
        "metrics_csv": result.metrics_csv,
        # "alpaca" or "chat": inference renders prompts the way this job's training did (inference/render.py).
        "data_format": _rendered_as(cfg.Dataset.train_file),
    }


def _merge_parent(parent: ParentModel, target: Path, ctx: TaskContext) -> None:
    """A fine-tune of a fine-tuned adapter trains on from that adapter merged into its base: merged here,
    once (a resumed job finds it), exactly as ``merge_adapter`` would merge it."""
    from .. import model_ops

    if (target / "config.json").is_file():
        return
    access = _model_access(ctx)
    base, adapter = access.check_model(parent.base_model, "model"), access.check_model(parent.adapter, "model")
    ctx.sink.message(f"merging {parent.model} into its base to train on from it")
    model_ops.merge(base, Path(adapter), target, sparse=parent.sparse, model_cache_dir=ctx.model_cache_dir)


def _rendered_as(train_file: str | None) -> str | None:
    """How training rendered the file's prompts: preference records are conversations (chat template)."""
    from ..training.records import inspect_training_file

    if not train_file:
        return None
    fmt = inspect_training_file(train_file).format
    return "chat" if fmt in ("preference", "prompt") else fmt


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
    p.model = _model_access(ctx).check_model(p.model, "model")
    if p.gguf is not None:  # its metadata is copied into the export: the source must be a readable model too
        source = export_source(p.model)
        if source is None:
            raise UserError(NO_SOURCE_GGUF, param="gguf")
        _model_access(ctx).check_model(str(source), "gguf")
    ctx.sink.message(f"merging {p.adapter} into {p.model}{' (SparsePEFT: zeros kept)' if p.sparse else ''}")
    try:
        report = model_ops.merge(
            p.model,
            Path(p.adapter),
            Path(p.output),
            sparse=p.sparse,
            model_cache_dir=ctx.model_cache_dir,
            gguf_type=p.gguf,
        )
    except GGUFExportError as exc:
        raise UserError(str(exc), param="gguf") from None
    return {
        "fine_tuning_job_id": p.fine_tuning_job_id,
        "adapter_version": p.version,
        "path": report["path"],
        "sparse": report["sparse"],  # a QA-SparsePEFT adapter always merges masked
        "dtype": report.get("dtype"),
        "zeros_preserved": report.get("zeros_preserved"),
        "sparsity": {"before": report.get("before"), "after": report.get("after")},
        "quantization": report.get("quantization"),
        "gguf": report.get("gguf"),
    }


def sparsify(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .. import model_ops

    p = SparsifyParams.model_validate(params)
    model_path = _model_access(ctx).check_model(p.model, "model")
    ctx.sink.message(f"sparsifying {p.model}: {p.method}, sparsity {p.sparsity}{f', {p.pattern}' if p.pattern else ''}")
    q = p.quantization

    def progress(done: int, layers: int) -> None:
        if done == layers or done % max(1, layers // 4) == 0:
            ctx.sink.message(f"GPTQ INT{q.bits}: {done}/{layers} decoder layers quantized")

    result = model_ops.sparsify(
        model_path,
        Path(p.output),
        method=p.method,
        sparsity=p.sparsity,
        pattern=p.pattern,
        calibration_file=p.calibration_path,
        calibration_label=p.calibration_file,
        n_calibration=p.n_calibration,
        model_cache_dir=ctx.model_cache_dir,
        quantization=q.model_dump() if q else None,
        progress=progress,
    )
    return {**result, "source_model": p.model}  # as the client named it, not the resolved path


def evaluate(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from ..evaluation import run_evaluation

    p = EvaluateParams.model_validate(params)
    access = _model_access(ctx)
    for c in p.candidates:  # the real paths checked now (a merged model's directory is the job's own)
        if not c.merged:
            c.model = access.check_model(c.model, "candidates")
        if c.tokenizer:
            c.tokenizer = access.check_model(c.tokenizer, "candidates")
    if p.split is not None:
        p.split["model"] = access.check_model(p.split["model"] or "", "fine_tuning_job_id")
        if p.split.get("tokenizer"):
            p.split["tokenizer"] = access.check_model(p.split["tokenizer"], "fine_tuning_job_id")
    rows = run_evaluation(p, ctx.sink, ctx.model_cache_dir)
    return {
        "file": p.file,
        "fine_tuning_job_id": p.fine_tuning_job_id,
        "max_samples": p.max_samples,
        "generate": p.generate,
        "data": rows,
    }


def _specs(models: dict[str, Any], access: Any) -> dict[str, Any]:
    """The models a batch or eval run names, as the engine loads them, the real paths checked now (a
    merged model's directory is the job's own)."""
    from ..inference.spec import ModelSpec

    specs = {}
    for name, m in models.items():
        model = m.model if m.merged else access.check_model(m.model, "model")
        tokenizer = access.check_model(m.tokenizer, "model") if m.tokenizer else None
        specs[name] = ModelSpec(name, model, tokenizer, m.adapter, m.data_format, m.sparse)
    return specs


def _answering(run: Callable[..., dict[str, Any]], p: Any, ctx: TaskContext, what: str) -> dict[str, Any]:
    """Run a batch or an eval run (``run``) of ``p`` on an engine of the job's own, with its models."""
    import torch

    specs = _specs(p.models, _model_access(ctx))
    ctx.sink.message(f"{what} with {len(specs)} model(s)")
    return run(
        p,
        specs,
        ctx.workspace.output.root,
        ctx.sink,
        ctx.should_stop,
        threads=torch.get_num_threads(),
        model_cache_dir=ctx.model_cache_dir,
    )


def batch(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .batch import run_batch

    p = BatchParams.model_validate(params)
    return _answering(run_batch, p, ctx, f"answering {p.total} requests to {p.endpoint}")


def eval_run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from .eval_run import run_eval

    p = EvalRunParams.model_validate(params)
    return _answering(run_eval, p, ctx, f"grading {p.total} rows with {len(p.testing_criteria)} grader(s)")


TASKS: dict[str, Callable[[dict[str, Any], TaskContext], dict[str, Any]]] = {
    "fine_tune": fine_tune,
    "extract": extract,
    "merge": merge,
    "sparsify": sparsify,
    "evaluate": evaluate,
    "batch": batch,
    "eval_run": eval_run,
}
# Kinds whose task polls ``should_stop`` between steps (a batch: between requests); the others stop
# at once on SIGTERM.
COOPERATIVE_STOP = {"fine_tune", "batch", "eval_run"}
