"""The operations behind ``sqft extract | merge | sparsify`` and the jobs of those kinds (``jobs/tasks.py``).

Each builds its output in a staging directory beside the target and publishes it with one rename, so a
reader (or a crash) never sees a half-written model, and two runs never interleave their files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .adapters.merge import merge_adapter, save_processor
from .adapters.nls import ELASTIC_CONFIG_FILE, extract_sub_adapter, select_ranks
from .adapters.qa.gptq import QUANTIZED_BASE_FILE, gptq_quantize_, save_quantized_base
from .adapters.sparse import sparsity_report
from .adapters.sparsify import misfit_widths, prunable_linears, sparsify_model
from .errors import InvalidConfigurationError
from .model_sources import NO_SOURCE_GGUF, GGUFExportError, export_source
from .training.device import operation_device
from .training.models import load_base_model, load_tokenizer, resolve_model_dir
from .training.prompts import alpaca_prompt
from .training.records import load_records, text_of
from .workspace import staged

# Used for Wanda's activation statistics when the caller gives no calibration file: generic prose,
# enough to estimate per-feature input norms (Wanda is robust to the calibration text, Sun et al. 2023 §5).
BUILTIN_CALIBRATION_TEXT = [
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences.",
    "A recipe is a set of instructions that describes how to prepare or make something, especially a dish "
    "of prepared food. Start by washing the vegetables, then cut them into small pieces.",
    "Question: Which gas do plants absorb from the air? Answer: Plants absorb carbon dioxide and release "
    "oxygen during photosynthesis, using energy from sunlight.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "The committee met on Tuesday to discuss the budget for next year. Several members argued that "
    "spending on public transport should increase, while others wanted lower taxes.",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, "
    "so water boils at a lower temperature and food takes longer to cook.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. Every "
    "morning he rowed his boat far out beyond the rocks.",
    "To reset your password, open the settings page, choose Security, and follow the instructions sent "
    "to your email address. The link expires after one hour.",
]


def calibration_texts(calibration_file: str | None, n_samples: int) -> list[str]:
    if not calibration_file:
        return BUILTIN_CALIBRATION_TEXT[:n_samples]
    texts = []
    for record in load_records(calibration_file)[:n_samples]:
        if "messages" in record:
            texts.append("\n".join(text_of(m.get("content")) for m in record["messages"]))
        else:
            texts.append(alpaca_prompt(record) + record["output"])
    return texts


def sparsify(
    model: str,
    output_dir: Path,
    *,
    method: str = "magnitude",
    sparsity: float = 0.5,
    pattern: str | None = None,
    calibration_file: str | None = None,
    n_calibration: int = 32,
    max_calibration_tokens: int = 256,
    model_cache_dir: Path | None = None,
    calibration_label: str | None = None,
    quantization: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Prune a base model and save it as a model directory a job can use as ``model``.

    ``calibration_label`` is how the result names the calibration data (e.g. the uploaded file's id
    rather than its path on the server). ``quantization`` (``{"method": "gptq", "bits", "group_size"}``)
    then quantizes the pruned linears by GPTQ on the same calibration text (``adapters/qa/gptq.py``):
    the saved weights are the INT model's, and ``QUANTIZED_BASE_FILE`` beside them holds what
    QA-SparsePEFT trains from. ``progress`` is called after each decoder layer GPTQ quantizes.
    """
    model_dir = resolve_model_dir(model, model_cache_dir)
    tokenizer = load_tokenizer(model_dir)
    base = load_base_model(model_dir)
    # The calibration passes and the per-row top-k run on the GPU when the model fits there.
    device = operation_device(base)
    base.to(device)
    if quantization is not None:
        _check_group_size(base, quantization["group_size"])  # before any weight changes
    calibration = None
    if method == "wanda" or quantization is not None:
        texts = calibration_texts(calibration_file, n_calibration)
        calibration = [
            torch.tensor([tokenizer(t, truncation=True, max_length=max_calibration_tokens)["input_ids"]]) for t in texts
        ]
    report = sparsify_model(base, method, sparsity, pattern, calibration if method == "wanda" else None)  # type: ignore[arg-type]
    quantized = None
    if quantization is not None:
        layers = gptq_quantize_(
            base, prunable_linears(base), calibration, quantization["bits"], quantization["group_size"], progress
        )
        quantized = {
            **quantization,
            "layers": len(layers),
            # ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs, averaged over the layers: GPTQ's
            # and what round-to-nearest would have left.
            "output_error": sum(r.error for r in layers.values()) / len(layers),
            "rtn_output_error": sum(r.rtn_error for r in layers.values()) / len(layers),
            # A kept weight can round to 0: the INT model is sparser than the pruning (QA trains the pruning's mask).
            "overall_zeros_after_rounding": sparsity_report(base, names=list(prunable_linears(base)))["overall"],
            "file": QUANTIZED_BASE_FILE,
        }
    result = {
        "path": str(output_dir.resolve()),
        "source_model": model,
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "calibration": calibration_label or calibration_file or ("builtin" if calibration else None),
        "report": report,
        "device": device.type,
        **({"quantization": quantized} if quantized else {}),
    }
    with staged(output_dir) as staging:
        staging.mkdir(parents=True)
        base.save_pretrained(staging)
        save_processor(model_dir, staging)  # first: it writes its tokenizer's files too
        tokenizer.save_pretrained(staging)
        if quantization is not None:
            save_quantized_base(staging, layers)
        (staging / "sparsity_report.json").write_text(json.dumps(result, indent=2))
    return result


def _check_group_size(model: torch.nn.Module, group_size: int) -> None:
    if widths := misfit_widths(prunable_linears(model), group_size):
        raise InvalidConfigurationError(
            f"`quantization.group_size` {group_size} must divide the input width of every decoder linear; "
            f"this model has layers {', '.join(map(str, widths))} wide",
            param="quantization.group_size",
        )


def merge(
    model: str,
    adapter_dir: Path,
    output_dir: Path,
    *,
    sparse: bool,
    model_cache_dir: Path | None = None,
    gguf_type: str | None = None,
) -> dict[str, Any]:
    """Merge a PEFT adapter into its base; save model + tokenizer in the base's dtype (QA-SparsePEFT: float32).

    With ``gguf_type`` (``gguf_export.GGUF_TYPES``) the merged model is also written as
    ``merged_model/model.gguf``, its metadata from the GGUF the base came from, else from the base's directory.

    Raises:
        GGUFExportError: ``gguf_type`` is set and the base has no metadata source we can write from.
    """
    base_gguf = None
    if gguf_type is not None:
        base_gguf = export_source(model)
        if base_gguf is None:
            raise GGUFExportError(NO_SOURCE_GGUF)
        if base_gguf.suffix != ".gguf":  # settings and tokenizer derived from the directory: checked first
            from .gguf_hf import check_source

            check_source(base_gguf)
    model_dir = resolve_model_dir(model, model_cache_dir)
    # "auto": keep the dtype the base was saved in, so the merged model has it too.
    base = load_base_model(model_dir, dtype="auto")
    base.to(operation_device(base))  # the adapter loads onto the base's device; saved files are device-free
    with staged(output_dir) as staging:
        write_gguf = None
        if base_gguf is not None:
            # The gguf package only when asked: the GPU image that runs tests/gpu has none.
            from .gguf_export import GGUF_FILE, export_gguf

            def write_gguf(merged: torch.nn.Module, quantizers: dict | None) -> dict[str, Any]:
                exported = export_gguf(merged, base_gguf, staging / GGUF_FILE, gguf_type, quantizers)
                return {**exported, "path": str(output_dir.resolve() / GGUF_FILE)}

        report = merge_adapter(
            base, adapter_dir, staging, sparse=sparse, tokenizer_dir=model_dir, after_merge=write_gguf
        )
    return {**report, "path": str(output_dir.resolve())}


def sub_adapter_ranks(super_adapter_dir: Path, version: str, custom_config: list[int] | None) -> list[int]:
    """The per-dimension ranks of a named (or custom) sub-adapter of an NLS super-adapter.

    Raises:
        ValueError: ``version`` is unknown or ``custom_config`` does not fit the search space.
    """
    elastic = json.loads((super_adapter_dir / ELASTIC_CONFIG_FILE).read_text())
    return select_ranks(elastic, version, custom_config)


def extract(super_adapter_dir: Path, output_dir: Path, ranks: list[int]) -> dict[str, Any]:
    """Write the sub-adapter with ``ranks`` as a stock PEFT adapter at ``output_dir``."""
    with staged(output_dir) as staging:
        summary = extract_sub_adapter(super_adapter_dir, staging, ranks)
        summary["path"] = str(output_dir.resolve())
        (staging / "sub_adapter.json").write_text(json.dumps(summary, indent=2))
    return summary
