"""Prune a base model in place (the sparse starting point of SQFT's pipeline, arXiv 2410.03750 Sec. 2).

Only the linear projections inside decoder layers are pruned (modules whose path has a layer index,
e.g. ``model.layers.3.mlp.up_proj``); embeddings and ``lm_head`` stay dense, as in Wanda.

* ``magnitude``: score ``|W|``.
* ``wanda`` (Sun et al., 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, where ``||X_j||`` is the
  L2 norm of input feature ``j`` over every calibration token reaching the layer. Norms are collected
  in one pass of the dense model with forward pre-hooks, the samples batched (``calibration.py``). (The
  reference Wanda code instead prunes layer by layer, feeding each layer the outputs of the
  already-pruned ones; one pass is cheaper and is what "Wanda without sequential calibration" computes.)

Both compare scores per output row (Wanda's comparison group; for magnitude it keeps every output
neuron equally sparse): each row loses its ``round(sparsity * in_features)`` lowest-scoring weights.
With an ``N:M`` pattern, every group of ``M`` consecutive input weights of a row keeps its ``N``
highest scores instead (``sparsity`` is then implied: ``1 - N/M``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InvalidConfigurationError
from .calibration import CALIBRATION_BATCH_TOKENS, calibration_batches
from .peft_utils import language_model_linears, layer_index
from .sparse import sparsity_report


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside numbered decoder layers of the language model (not embeddings,
    ``lm_head``, nor an image-text model's vision tower: ``peft_utils.language_model_linears``)."""
    # "Inside" a numbered layer: the index is in the parent path, so a Linear that is itself the
    # numbered entry of a ModuleList (``blocks.0``) is not taken for a decoder layer.
    return {
        name: module
        for name, module in language_model_linears(model).items()
        if layer_index(name.rpartition(".")[0]) is not None
    }


def misfit_widths(layers: dict[str, nn.Linear], divisor: int) -> list[int]:
    """The input widths among ``layers`` that ``divisor`` does not divide (an N:M pattern's M, a group size)."""
    return sorted({m.in_features for m in layers.values() if m.in_features % divisor})


def _parse_pattern(pattern: str) -> tuple[int, int]:
    """``N:M`` as two ints; a pattern that cannot work is the client's error (a ValueError too), naming it."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise InvalidConfigurationError(
            f"sparsity pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4')", param="pattern"
        ) from None
    if not 0 < n < m:
        raise InvalidConfigurationError(f"sparsity pattern {pattern!r} needs 0 < N < M", param="pattern")
    return n, m


@torch.no_grad()
def _input_norms(
    model: nn.Module, layers: dict[str, nn.Linear], samples: list[torch.Tensor], max_tokens: int
) -> dict[str, torch.Tensor]:
    # Kept on each layer's device: a GPU calibration pass then never waits on a copy to the host.
    sq_sums = {
        name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for name, m in layers.items()
    }
    real: list[torch.Tensor] = []  # this batch's real-token mask: padding counts nowhere

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = (args[0].detach().double() * real[0]).reshape(-1, args[0].shape[-1])
            sq_sums[name] += (x * x).sum(0)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    # Only the last position's logits (transformers' ``logits_to_keep``): the head's GEMM over every
    # token is work no norm needs.
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        for ids, mask in calibration_batches(samples, max_tokens):
            real[:] = [mask.to(device, torch.float64)]
            model(input_ids=ids.to(device), use_cache=False, **head)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt() for name, s in sq_sums.items()}


def _prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Bool mask of the weights to zero (lowest scores per row, or per M-group)."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"in_features={cols} is not a multiple of M={m}")
        groups = score.reshape(rows, cols // m, m)
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
        return drop.reshape(rows, cols)
    k = round(sparsity * cols)
    drop = torch.zeros_like(score, dtype=torch.bool)
    if k:
        drop.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return drop


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    method: Literal["magnitude", "wanda"] = "magnitude",
    sparsity: float = 0.5,
    pattern: str | None = None,
    calibration_input_ids: list[torch.Tensor] | None = None,
    batch_tokens: int = CALIBRATION_BATCH_TOKENS,
) -> dict[str, Any]:
    """Zero weights of the decoder linears in place.

    Args:
        model: A causal LM (dense; pruned in place).
        method: ``magnitude`` or ``wanda``.
        sparsity: Fraction of each row to zero (ignored with ``pattern``).
        pattern: ``"N:M"`` semi-structured sparsity (e.g. ``"2:4"``), or ``None`` for unstructured.
        calibration_input_ids: Token-id tensors (``[seq]`` or ``[1, seq]``) for ``wanda``.
        batch_tokens: Tokens per calibration forward, padding included (``calibration.py``; 1: a sample at a time).

    Returns:
        ``method``, ``sparsity`` (target), ``pattern``, ``overall`` achieved zero fraction and
        ``layers`` (per pruned module).

    Raises:
        ValueError: On an unknown method, a sparsity outside [0, 1), a bad pattern, or ``wanda``
            without calibration data.
    """
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"unknown pruning method {method!r} (expected 'magnitude' or 'wanda')")
    nm = _parse_pattern(pattern) if pattern else None
    if nm is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = prunable_linears(model)
    if not layers:
        raise ValueError("the model has no linear layer inside numbered decoder layers")
    if nm is not None and (widths := misfit_widths(layers, nm[1])):
        # Checked before any weight changes, so the message names every width that does not fit.
        raise InvalidConfigurationError(
            f"sparsity pattern {pattern!r} needs M={nm[1]} to divide the input width of every pruned layer; "
            f"this model has layers {', '.join(map(str, widths))} wide",
            param="pattern",
        )
    norms = None
    if method == "wanda":
        if not calibration_input_ids:
            raise ValueError("wanda pruning needs calibration_input_ids")
        norms = _input_norms(model, layers, calibration_input_ids, batch_tokens)
    for name, module in layers.items():
        weight = module.weight
        score = weight.detach().abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device, torch.float32).unsqueeze(0)
        weight.masked_fill_(_prune_mask(score, sparsity, nm), 0)
    report = sparsity_report(model, names=list(layers))
    return {
        "method": method,
        "sparsity": 1 - nm[0] / nm[1] if nm else sparsity,
        "pattern": pattern,
        "overall": report["overall"],
        "layers": report["layers"],
    }
