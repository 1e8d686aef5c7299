"""GPTQ for a (sparse) base: the INT base of QA-SparsePEFT, made as SQFT makes it (arXiv 2410.03750 Sec. 3.3).

GPTQ (Frantar et al., 2022, arXiv 2210.17323) quantizes a linear weight one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian ``H = X^T X`` of the layer's calibration inputs, so the layer's *outputs* move less than with
round-to-nearest (RTN). Decoder layers are quantized in order, each calibrated on the outputs of the
already-quantized ones (the reference "sequential" mode), by replaying the arguments the model gave its
first decoder layer (AutoGPTQ's "catcher"), so one forward of each layer per calibration batch suffices
(samples batched right-padded: ``adapters/calibration.py``).

Three things differ from the reference code, and are why this is written here instead of taken from
AutoGPTQ / GPTQModel (which also need their CUDA kernels and write their own packed formats):

* a pruned weight stays exactly 0: its code is the zero point, and the drift the compensation gave it
  is propagated as error like any rounding error (SparseGPT's joint sparsity + quantization);
* the quantizer is :class:`~.quantizer.GroupQuantizer` (float16-exact scales), so GGUF and
  ``sqft_int_weights.safetensors`` hold the same integers; a group's parameters are fitted when its
  first column is reached, on the columns as compensated so far (the blocks are whole groups);
* it also returns ``W~``, each column as compensated just before its rounding: ``Q(W~)`` *is* the GPTQ
  weight, bit for bit, and QA-SparsePEFT trains ``Q(W~ + M * delta)`` from it: a float base whose
  weights lie anywhere in their code's interval, like the RTN base, not on its centre (``qa/peft.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..calibration import CALIBRATION_BATCH_TOKENS, calibration_batches
from .quantizer import GroupQuantizer, save_quantizers

QUANTIZED_BASE_FILE = "sqft_quantized_base.safetensors"  # in a GPTQ base's model directory
FLOAT_SUFFIX = ".float_weight"  # W~ of a layer, beside its scales and zeros
GPTQ_METHOD = "gptq-sequential-f16scales"
_ATTRIBUTE = "sqft_quantized_base"  # set on a loaded model whose directory holds QUANTIZED_BASE_FILE


@dataclass
class LayerResult:
    """One quantized weight: its quantizer, ``W~`` and the calibration output errors of GPTQ and of RTN."""

    quantizer: GroupQuantizer
    float_weight: torch.Tensor
    error: float
    rtn_error: float


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (W - Q)^T||^2 / ||X W^T||^2`` over the calibration inputs, from ``H = X^T X``."""
    diff = weight - quantized
    total = float(((weight @ hessian) * weight).sum())
    return float(((diff @ hessian) * diff).sum()) / total if total > 0 else 0.0


@torch.no_grad()
def gptq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, block: int = 128
) -> LayerResult:
    """GPTQ of one ``(out, in)`` weight (unchanged) given ``H = X^T X`` of its inputs; zeros stay zeros."""
    return gptq_weights([weight], hessian, bits, group_size, damp, block)[0]


@torch.no_grad()
def gptq_weights(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
) -> list[LayerResult]:
    """GPTQ of weights that share their input (q, k, v; gate, up), as one: their rows stacked.

    Every row is quantized on its own given ``H`` (the error spreads along a row, never across rows), so
    stacking changes no result (bit for bit); the column loop and the inverse Hessian then run once for
    the group instead of once per weight.
    """
    stacked = torch.cat([w.detach().float() for w in weights]) if len(weights) > 1 else weights[0]
    quantizer, tilde = _gptq(stacked, hessian, bits, group_size, damp, block)
    hess = hessian.float()
    results, start = [], 0
    for weight in weights:
        rows = slice(start, start + weight.shape[0])
        start = rows.stop
        part = GroupQuantizer(scale=quantizer.scale[rows], zero=quantizer.zero[rows], bits=bits, group_size=group_size)
        original = weight.detach().float()
        rtn = GroupQuantizer.fit(original, bits, group_size).fake_quantize(original)
        results.append(
            LayerResult(
                quantizer=part,
                float_weight=tilde[rows],
                error=_output_error(original, part.fake_quantize(tilde[rows]), hess),
                rtn_error=_output_error(original, rtn, hess),
            )
        )
    return results


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float, block: int
) -> tuple[GroupQuantizer, torch.Tensor]:
    """The column loop of GPTQ: the quantizer and ``W~`` of ``weight``."""
    w = weight.detach().float().clone()
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide the {cols} inputs of the weight")
    keep = (w != 0).float()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # an input never active in calibration: nothing to compensate with
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads over later columns.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    block = max(group_size, block // group_size * group_size)  # whole groups per block
    scale = torch.empty(out, cols // group_size, device=w.device)
    zero = torch.empty_like(scale)
    tilde = torch.empty_like(w)
    qmax = 2**bits - 1
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=w.device), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                group = w1[:, i : i + group_size] * keep[:, col : col + group_size]
                fitted = GroupQuantizer.fit(group, bits, group_size)
                scale[:, g], zero[:, g] = fitted.scale[:, 0], fitted.zero[:, 0]
                s, z = scale[:, g], zero[:, g]  # this group's, read once (the loop is dispatch-bound)
            current = w1[:, i] * keep[:, col]
            tilde[:, col] = current
            # The same operations as GroupQuantizer's fake quantization, so Q(W~) is these values exactly.
            q = ((torch.round(current / s) + z).clamp_(0, qmax) - z).mul_(s)
            err = (w1[:, i] - q).div_(u1[i, i])  # a pruned weight's drift counts as error too
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1.0)  # in place: no (out, block) temporary
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return GroupQuantizer(scale=scale, zero=zero, bits=bits, group_size=group_size), tilde


class _Captured(Exception):
    """Raised by the first decoder layer's pre-hook once it holds its inputs (the rest of the model is not run)."""


def _decoder_layers(model: nn.Module, linears: dict[str, nn.Linear]) -> list[tuple[nn.Module, dict[str, nn.Linear]]]:
    """Each decoder layer (the module at the numbered path component) with its linears, in layer order."""
    modules = dict(model.named_modules())
    layers: dict[str, dict[str, nn.Linear]] = {}
    for name, linear in linears.items():
        parts = name.split(".")
        at = next(i for i, part in enumerate(parts) if part.isdigit())
        layers.setdefault(".".join(parts[: at + 1]), {})[name] = linear
    ordered = sorted(layers, key=lambda path: int(path.rpartition(".")[2]))
    return [(modules[path], layers[path]) for path in ordered]


@dataclass
class _Call:
    """One recorded call of a decoder layer: its arguments, and which rows are real tokens (1) or padding (0)."""

    args: tuple
    kwargs: dict
    real: Tensor  # [batch, seq, 1]


def _first_layer_inputs(
    model: nn.Module, first: nn.Module, samples: list[torch.Tensor], max_tokens: int = CALIBRATION_BATCH_TOKENS
) -> list[_Call]:
    """The arguments the model calls its first decoder layer with, batch by batch (``calibration_batches``)."""
    calls: list[_Call] = []
    caught: list[tuple[tuple, dict]] = []
    device = next(model.parameters()).device

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids, real in calibration_batches(samples, max_tokens):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
            args, kwargs = caught.pop()
            calls.append(_Call(args, kwargs, real.to(device)))
    finally:
        handle.remove()
    return calls


def _hessians(
    layer: nn.Module, members: dict[str, nn.Linear], calls: list[_Call]
) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``X^T X`` of the inputs of ``members`` while ``layer`` runs on every recorded call (padding rows
    zeroed), once per input: linears fed the same tensor (q, k, v; gate, up) share it. Returns the
    Hessians and the linears fed each, both keyed by the first linear fed it."""
    hessians: dict[str, Tensor] = {}
    fed: dict[str, list[str]] = {}
    seen: list[tuple[Tensor, str]] = []  # this call's inputs so far, each with the first linear fed it
    real: list[Tensor] = []  # this call's real-token mask

    def make_hook(name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            first = next((lead for held, lead in seen if held is x), None)
            if first is None:
                seen.append((x, name))
                flat = (x.detach().float() * real[0]).reshape(-1, x.shape[-1])
                if name not in hessians:
                    hessians[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
                    fed[name] = [name]
                hessians[name] += flat.T @ flat
            elif name not in fed[first]:
                fed[first].append(name)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in members.items()]
    try:
        for call in calls:
            seen.clear()
            real[:] = [call.real]
            layer(*call.args, **call.kwargs)
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    for name, m in members.items():  # a linear the calibration never reached: no input to compensate with
        if not any(name in names for names in fed.values()):
            hessians[name] = torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            fed[name] = [name]
    return hessians, fed


def _with_hidden(call: _Call, hidden: torch.Tensor) -> _Call:
    if call.args:
        return _Call((hidden, *call.args[1:]), call.kwargs, call.real)
    return _Call(call.args, {**call.kwargs, "hidden_states": hidden}, call.real)


@torch.no_grad()
def gptq_quantize_(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    samples: list[torch.Tensor],
    bits: int,
    group_size: int,
    progress: Callable[[int, int], None] | None = None,
    batch_tokens: int = CALIBRATION_BATCH_TOKENS,
) -> dict[str, LayerResult]:
    """Quantize ``linears`` (inside numbered decoder layers) of ``model`` in place to ``Q(W~)``, layer by layer.

    Args:
        model: A causal LM whose decoder layers take the hidden states first.
        linears: Module path -> linear to quantize (``sparsify.prunable_linears``).
        samples: Calibration token ids (``[seq]`` or ``[1, seq]``).
        bits: Bits per code.
        group_size: Inputs per scale (must divide every layer's input size).
        progress: Called with (layers done, layers) after each decoder layer.
        batch_tokens: Tokens per calibration forward, padding included (1: a sample at a time).
    """
    layers = _decoder_layers(model, linears)
    calls = _first_layer_inputs(model, layers[0][0], samples, batch_tokens)
    results: dict[str, LayerResult] = {}
    for done, (layer, members) in enumerate(layers, start=1):
        hessians, fed = _hessians(layer, members, calls)
        for first, names in fed.items():
            weights = [members[name].weight for name in names]
            for name, result in zip(names, gptq_weights(weights, hessians[first], bits, group_size), strict=True):
                linear = members[name]
                linear.weight.data = result.quantizer.fake_quantize(result.float_weight).to(linear.weight.dtype)
                results[name] = result
        # The next layer is calibrated on this one's quantized outputs.
        for index, call in enumerate(calls):
            output = layer(*call.args, **call.kwargs)
            calls[index] = _with_hidden(call, output[0] if isinstance(output, tuple) else output)
        if progress is not None:
            progress(done, len(layers))
    return results


def save_quantized_base(directory: Path, results: dict[str, LayerResult]) -> Path:
    """Write the quantizers and ``W~`` of every quantized layer into ``directory`` (:data:`QUANTIZED_BASE_FILE`)."""
    return save_quantizers(
        Path(directory) / QUANTIZED_BASE_FILE,
        {name: r.quantizer for name, r in results.items()},
        extra={f"{name}{FLOAT_SUFFIX}": r.float_weight.detach().cpu().contiguous() for name, r in results.items()},
        method=GPTQ_METHOD,
    )


class QuantizedBase:
    """The quantizers and float weights ``W~`` a GPTQ base directory holds, read one layer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
        self.names = sorted(key.removesuffix(".scales") for key in keys if key.endswith(".scales"))
        self.bits, self.group_size = int(meta["bits"]), int(meta["group_size"])

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def _tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(key)

    def quantizer(self, name: str) -> GroupQuantizer:
        scale, zero = self._tensor(f"{name}.scales"), self._tensor(f"{name}.zeros").float()
        return GroupQuantizer(scale, zero, self.bits, self.group_size)

    def float_weight(self, name: str) -> torch.Tensor:
        return self._tensor(f"{name}{FLOAT_SUFFIX}")


def attach_quantized_base(model: nn.Module, model_dir: str | Path) -> None:
    """Remember on a just-loaded model that its directory is a GPTQ base (QA-SparsePEFT then trains on ``W~``)."""
    path = Path(model_dir) / QUANTIZED_BASE_FILE
    if path.is_file():
        setattr(model, _ATTRIBUTE, QuantizedBase(path))


def quantized_base_of(model: Any) -> QuantizedBase | None:
    """The GPTQ base a loaded model (or a PEFT model around it) came from, if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, _ATTRIBUTE, None)
