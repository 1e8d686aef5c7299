"""Zero fractions of linear weights (how sparse a pruned or merged model is)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..peft_utils import matches_module

_SKIP = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out")


def _skipped(parts: list[str]) -> bool:
    # Embeddings / lm_head stay dense; lora_A / lora_B of a PeftModel are not base weights.
    return any(p in _SKIP or p.startswith("lora_") for p in parts)


def _linear_weights(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        # Inside a PeftModel the linear is `<name>.base_layer`: report it under `<name>`.
        out = {}
        for name, module in source.named_modules():
            parts = name.split(".")
            if isinstance(module, nn.Linear) and not _skipped(parts):
                out[name.removesuffix(".base_layer")] = module.weight
        return out
    return {
        key.removesuffix(".weight"): value
        for key, value in source.items()
        if key.endswith(".weight") and value.dim() == 2 and not _skipped(key.split("."))
    }


def sparsity_report(
    source: nn.Module | Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Overall and per-layer zero fraction of linear weights (embeddings and ``lm_head`` excluded).

    Args:
        source: A model (its ``nn.Linear`` weights) or a state dict (its 2-D ``*.weight`` tensors).
        names: Restrict to these module names (entries match a full name or a dotted suffix).

    Returns:
        ``{"overall": frac, "zeros": n, "total": n, "layers": {name: frac}}``.
    """
    weights = _linear_weights(source)
    if names is not None:
        keys = list(names)
        weights = {n: w for n, w in weights.items() if any(matches_module(n, k) for k in keys)}
    layers, zeros, total = {}, 0, 0
    for name, weight in weights.items():
        n_zero = int((weight == 0).sum())
        layers[name] = n_zero / weight.numel()
        zeros += n_zero
        total += weight.numel()
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "total": total, "layers": layers}
