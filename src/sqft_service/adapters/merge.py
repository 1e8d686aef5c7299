"""Merge a trained LoRA adapter into its base model and save a plain transformers checkpoint.

With ``sparse=True`` (SparsePEFT, SQFT Sec. 3.2) the merge adds ``M * delta`` where ``M`` is the
base weight's non-zero mask, so the merged weights keep every zero of the pruned base. PEFT's
``merge_and_unload`` adds the unmasked ``B @ A`` delta; we therefore switch the loaded layers to
:class:`~sqft_service.adapters.sparse.SparseLoraLinear` first, whose ``get_delta_weight`` is masked,
and let PEFT's own merge use it (exact: a zero stays ``0 + 0``).

A QA-SparsePEFT adapter (its quantizers saved beside it, ``adapters/qa``) is merged through the base's
quantizer: the merged weights are the integers the trained model computed with, kept in float32 in the
model and as codes + scales + zero points in :data:`~sqft_service.adapters.qa.INT_WEIGHTS_FILE`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .peft_utils import base_of, language_model_linears, lora_layers
from .qa import (
    GroupQuantizer,
    attach_quantized_base,
    enable_quantization_aware,
    quantized_base_of,
    save_int_weights,
    saved_quantizers,
)
from .sparse import enable_sparse_peft, sparsity_report


def _enable_masked(peft_model: PeftModel, quantizers: dict | None) -> None:
    """SparsePEFT on the loaded adapter, through its saved quantizers if it is a QA-SparsePEFT one."""
    if quantizers is None:
        enable_sparse_peft(peft_model, peft_model.active_adapter)
        return
    first = next(iter(quantizers.values()))
    enable_quantization_aware(peft_model, first.bits, first.group_size, quantizers, peft_model.active_adapter)


def masked_merge(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The base ``model`` (modified in place) with a SparsePEFT adapter's masked update folded in.

    ``W + M * delta`` in the base weight's dtype: what :class:`SparseLoraLinear`'s fused (eval) forward
    computes, so the result answers exactly as the trained model and keeps every zero of the base
    (for a QA-SparsePEFT adapter: ``Q(W + M * delta)`` with its saved quantizers).
    """
    quantizers = saved_quantizers(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    _enable_masked(peft_model, quantizers)
    return peft_model.merge_and_unload()


def merge_adapter(
    base_model_path_or_model: str | Path | nn.Module,
    adapter_dir: str | Path,
    output_dir: str | Path,
    sparse: bool,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    after_merge: Callable[[nn.Module, dict[str, GroupQuantizer] | None], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into the base model and save the result with ``save_pretrained``.

    Args:
        base_model_path_or_model: A local HF model directory, or an already loaded model (e.g. from a
            GGUF file); a passed model is modified in place.
        adapter_dir: A saved PEFT LoRA adapter.
        output_dir: Where the merged model goes.
        sparse: Mask the adapter delta with the base's non-zero pattern (SparsePEFT merge). A
            QA-SparsePEFT adapter is always merged masked, through its quantizers.
        dtype: The dtype to load and save in (default: the base model's own dtype; float32 for a
            QA-SparsePEFT adapter, whose integer grid bf16 can't hold exactly).
        tokenizer_dir: If given, its tokenizer is saved beside the merged model.
        after_merge: Called with the merged model once it is saved, and the adapter's QA quantizers
            (or None), e.g. a GGUF export; what it returns is the report's ``gguf``.

    Returns:
        ``path``, ``dtype``, ``sparse``, ``adapted_modules`` and the sparsity reports ``before`` /
        ``after`` (overall over all decoder linears, and per adapted layer), plus
        ``zeros_preserved`` (every zero of an adapted base weight is still zero); for a QA-SparsePEFT
        adapter also ``quantization`` (``bits``, ``group_size``, ``layers``, ``int_weights`` file).
    """
    quantizers = saved_quantizers(adapter_dir)
    if quantizers is not None:
        sparse = True
        dtype = dtype or torch.float32
    if isinstance(base_model_path_or_model, nn.Module):
        model = base_model_path_or_model
        if dtype is not None:
            model = model.to(dtype)
    else:
        from ..training.models import model_class

        model = model_class(str(base_model_path_or_model)).from_pretrained(
            str(base_model_path_or_model), dtype=dtype or "auto", use_safetensors=True
        )  # safetensors only: never unpickle a checkpoint
        attach_quantized_base(model, base_model_path_or_model)
    save_dtype = dtype or next(model.parameters()).dtype
    text_linears = list(language_model_linears(model))  # an image-text model's vision tower is no part of it
    before_all = sparsity_report(model, names=text_linears)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    layers = lora_layers(peft_model, peft_model.active_adapter)
    adapted = [name for name, _ in layers]
    if sparse:
        # First: on a GPTQ base this puts W~ under the adapted layers, whose zeros are the pruning's.
        _enable_masked(peft_model, quantizers)
    before = sparsity_report(base_of(peft_model), names=adapted)
    zero_masks = {name: layer.get_base_layer().weight.detach() == 0 for name, layer in layers}
    merged = peft_model.merge_and_unload()
    gptq = quantized_base_of(model)
    if quantizers is not None and gptq is not None:
        # The GPTQ base's other layers are its integers as loaded: the export writes every INT layer.
        quantizers = {**{n: gptq.quantizer(n) for n in gptq.names if n not in quantizers}, **quantizers}
    modules = dict(merged.named_modules())
    preserved = all(bool((modules[name].weight[mask] == 0).all()) for name, mask in zero_masks.items())
    merged = merged.to(save_dtype)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    quantization = None
    if quantizers is not None:
        path = save_int_weights({name: modules[name].weight for name in quantizers}, quantizers, out)
        first = next(iter(quantizers.values()))
        quantization = {
            "bits": first.bits,
            "group_size": first.group_size,
            "layers": len(quantizers),
            **({"base": "gptq"} if gptq is not None else {}),
            "int_weights": path.name,
        }
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        save_processor(tokenizer_dir, out)  # first: it writes its tokenizer's files too
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    exported = after_merge(merged, quantizers) if after_merge is not None else None
    after = sparsity_report(merged, names=adapted)
    return {
        "path": str(out),
        "dtype": str(save_dtype).removeprefix("torch."),
        "sparse": sparse,
        "adapted_modules": len(adapted),
        "before": {"overall": before_all["overall"], "adapted": before},
        "after": {"overall": sparsity_report(merged, names=text_linears)["overall"], "adapted": after},
        "zeros_preserved": preserved,
        **({"quantization": quantization} if quantization else {}),
        **({"gguf": exported} if exported is not None else {}),
    }


def save_processor(source: str | Path, out: str | Path) -> None:
    """An image-text model's processor (its images' size and tokens) saved from ``source`` at ``out``, so
    the merged or pruned model takes images as its base did (``inference/images.py``); nothing for others."""
    import shutil

    from ..inference.images import PROCESSOR_FILES, load_processor

    if any((Path(source) / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        processor = load_processor(str(source))
        if not getattr(processor, "without_video", False):
            processor.save_pretrained(str(out))
            return
        # Built without its video half (no torchvision here): the source's own files, as they were.
        for name in PROCESSOR_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, Path(out) / name)
