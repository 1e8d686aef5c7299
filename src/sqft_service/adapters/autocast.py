"""What the adapters do differently under autocast: fewer casts, each a kernel forward and one backward.

A launch-bound GPU step pays per kernel (``bench/gpu/launches.py`` counts them). Autocast casts a
layer's input for every matmul that reads it, and an fp32 adapter weight at every use:

* q, k and v, each with its adapter, would cast the same activation six times: one
  :class:`SharedInputCast` per model makes it once for all of them;
* every adapter would cast its A and B in every forward and their gradients back in every backward,
  four kernels per adapter: :func:`cast_adapter_weights` casts all adapter weights of the model in
  one kernel at the start of a decoder forward (and their gradients back in one), for that forward
  only. The values are the very ones autocast would make, so the arithmetic is unchanged.

Both step aside inside a ``torch.compile`` graph, which merges casts itself and would break on the
Python-side bookkeeping.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

INPUT_CAST_ATTR = "_sqft_input_cast"


class SharedInputCast:
    """The autocast-dtype copy of the last activation cast, for the sibling layers that read the same one.

    Held like :class:`~sqft_service.adapters.dropout.SharedInputDropout` holds its mask: the input
    weakly (a freed tensor never matches, even if its memory is reused) and checked by version, the
    copy strongly; at most one activation-sized tensor is kept between steps.
    """

    def __init__(self) -> None:
        self._input: weakref.ref | None = None
        self._key: tuple[int, torch.dtype, bool] | None = None
        self._output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled graph merges equal casts itself
            return x.to(dtype)
        key = (x._version, dtype, torch.is_grad_enabled())
        if self._output is not None and self._input is not None and self._input() is x and self._key == key:
            return self._output
        self._output = x.to(dtype)
        self._input, self._key = weakref.ref(x), key
        return self._output


def autocast_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(x in the autocast dtype, True)`` under autocast, cast once for the module's siblings;
    ``(x, False)`` otherwise (or for a module without a :class:`SharedInputCast`)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, False
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = getattr(module, INPUT_CAST_ATTR, None)
    if cast is not None and x.is_floating_point() and x.dtype != dtype:
        x = cast(x, dtype)
    return x, True


WEIGHTS_ATTR = "_sqft_weight_casts"


class _CastAll(torch.autograd.Function):
    """Cast many tensors in one kernel: concatenated, cast, split into views. The backward likewise."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shapes, ctx.dtype = [w.shape for w in weights], weights[0].dtype
        return _split(torch.cat([w.reshape(-1) for w in weights]).to(dtype), ctx.shapes)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *_split(torch.cat([g.reshape(-1) for g in grads]).to(ctx.dtype), ctx.shapes))


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> tuple[torch.Tensor, ...]:
    parts = flat.split([shape.numel() for shape in shapes])
    return tuple(part.view(shape) for part, shape in zip(parts, shapes, strict=True))


def adapter_weights(module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` of ``adapter`` as cast for the current decoder forward, or ``None`` (use the weights)."""
    casts = getattr(module, WEIGHTS_ATTR, None)
    return None if casts is None else casts.get(adapter)


def cast_adapter_weights(decoder: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Cast the LoRA weights of ``layers`` once per forward of ``decoder`` under autocast.

    A forward pre-hook makes the casts (one :class:`_CastAll`) and hands each layer its pair; a forward
    hook takes them back, so a layer called outside a decoder forward (or in a gradient-checkpoint
    recomputation) casts its own weights as before.
    """
    layers = list(layers)

    def give(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        device = next(iter(layers[0].lora_A.values())).weight.device
        if torch.compiler.is_compiling() or not torch.is_autocast_enabled(device.type):
            return
        pairs = [(m, a) for m in layers for a in m.active_adapters if a in m.lora_A]
        weights = [w for m, a in pairs for w in (m.lora_A[a].weight, m.lora_B[a].weight)]
        if not weights or any(w.dtype != weights[0].dtype for w in weights):
            return
        casts = _CastAll.apply(torch.get_autocast_dtype(device.type), *weights)
        for i, (module, adapter) in enumerate(pairs):
            getattr(module, WEIGHTS_ATTR)[adapter] = (casts[2 * i], casts[2 * i + 1])

    def take_back(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        for module in layers:
            getattr(module, WEIGHTS_ATTR).clear()

    for module in layers:
        setattr(module, WEIGHTS_ATTR, {})
    decoder.register_forward_pre_hook(give, with_kwargs=True)
    decoder.register_forward_hook(take_back, with_kwargs=True)
