"""What the adapters do differently under autocast: fewer casts, each a kernel forward and one backward.

A launch-bound GPU step pays per kernel (``bench/gpu/launches.py`` counts them). Autocast casts a
layer's input for every matmul that reads it, and an fp32 adapter weight at every use:

* q, k and v, each with its adapter, would cast the same activation six times: one
  :class:`SharedInputCast` per model makes it once for all of them;
* every adapter would cast its A and B in every forward and their gradients back in every backward,
  four kernels per adapter: :func:`cast_adapter_weights` casts all adapter weights of the model in
  one kernel at the start of a decoder forward (and their gradients back in one); the layers use
  those casts until the weights change. The values are the very ones autocast would make, so the
  arithmetic is unchanged; under NLS the cast B carries the rank mask (``B @ diag(m)``), which
  computes what masking the rank-r activation does, without an operator per adapter.

Both step aside inside a ``torch.compile`` graph, which merges casts itself and would break on the
Python-side bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .memo import LastInputMemo
from .nls.controller import nls_mask_version, nls_rank_mask
from .peft_utils import base_of

INPUT_CAST_ATTR = "_sqft_input_cast"


class SharedInputCast:
    """The autocast-dtype copy of the last activation cast, for the sibling layers that read the same one
    (a :class:`~sqft_service.adapters.memo.LastInputMemo`, keyed by the input's version, the dtype and
    whether autograd records)."""

    def __init__(self) -> None:
        self._memo = LastInputMemo()

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled graph merges equal casts itself
            return x.to(dtype)
        key = (x._version, dtype, torch.is_grad_enabled())
        cast = self._memo.get(x, key)
        return cast if cast is not None else self._memo.put(x, key, x.to(dtype))


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
# Set on a decoder whose layers run compiled (training/compiled.py): they cast in their own graphs.
COMPILED_ATTR = "_sqft_layers_compiled"


@dataclass(frozen=True)
class WeightCast:
    """One adapter's A and B in the autocast dtype, as cast at the start of a decoder forward.

    ``masked``: B is already multiplied by the layer's NLS rank-mask row (``B @ diag(m)``), which
    gives the sliced sub-adapter forward and backward without masking the activation. ``key``: the
    versions of A, B and the rank mask at the cast, and whether autograd recorded it; a cast is used
    only while they hold (an optimizer step or a new sub-adapter makes it stale). ``weights``: the
    A and B parameters that were cast (their versions are read from them, without module lookups).
    """

    a: torch.Tensor
    b: torch.Tensor
    masked: bool
    key: tuple[int, int, int, bool]
    weights: tuple[torch.Tensor, torch.Tensor]


class _CastAll(torch.autograd.Function):
    """Cast many tensors in one kernel: concatenated, cast, split into views; the backward likewise.

    Args of ``apply``: the dtype, the B rank masks (``[sum of B rows, r]``, or ``None``), the number
    of A weights, then every A and every B (in that order).
    """

    @staticmethod
    def forward(ctx, dtype, b_mask, n_a, *weights):
        # torch's C++ flatten/unflatten (DDP's bucketing helpers): the 2 x layers x adapters reshapes
        # and views cost half the host time they do from Python. There are always >= 2 weights (an A
        # and a B), so the flat tensor is a new one, never a view of a weight.
        ctx.dtype, ctx.b_start = weights[0].dtype, sum(w.numel() for w in weights[:n_a])
        flat = _flatten_dense_tensors(weights)
        if b_mask is not None:
            flat[ctx.b_start :].mul_(b_mask.reshape(-1))
        ctx.save_for_backward(b_mask)
        return tuple(_unflatten_dense_tensors(flat.to(dtype), weights))

    @staticmethod
    def backward(ctx, *grads):
        (b_mask,) = ctx.saved_tensors
        flat = _flatten_dense_tensors(grads).to(ctx.dtype)
        if b_mask is not None:  # masked ranks get no gradient, as if sliced away (a 0/1 mask: exact in any dtype)
            flat[ctx.b_start :].mul_(b_mask.reshape(-1))
        return (None, None, None, *_unflatten_dense_tensors(flat, grads))


def _key(a: torch.Tensor, b: torch.Tensor, mask_version: int) -> tuple[int, int, int, bool]:
    return (a._version, b._version, mask_version, torch.is_grad_enabled())


def adapter_weights(module: nn.Module, adapter: str) -> WeightCast | None:
    """The current :class:`WeightCast` of ``adapter``, or ``None`` (cast the weights at use, as autocast does)."""
    if torch.compiler.is_compiling():  # a compiled layer casts (and masks) in its own graph
        return None
    cast = getattr(module, WEIGHTS_ATTR, {}).get(adapter)
    if cast is None:
        return None
    key = _key(*cast.weights, nls_mask_version(module))
    # A cast made without autograd never serves a forward that needs gradients (the reverse is fine).
    if key[:3] != cast.key[:3] or (key[3] and not cast.key[3]):
        return None
    return cast


def adapter_operands(module: nn.Module, adapter: str, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(A, B, masked)`` for a layer's forward to compute with: under autocast the decoder forward's
    current casts (:func:`adapter_weights`), else the weights themselves; ``masked``: B already
    carries the NLS rank mask (the caller applies :func:`nls_rank_mask` otherwise)."""
    cast = adapter_weights(module, adapter) if autocast else None
    if cast is not None:
        return cast.a, cast.b, cast.masked
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, False


def cast_adapter_weights(peft_model: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Cast the LoRA weights of ``layers`` once per forward of the model's decoder under autocast.

    A model without ``get_decoder`` is left alone (its layers cast their weights at use).

    A forward pre-hook makes the casts (one :class:`_CastAll`, NLS rank masks included) and hands
    each layer its :class:`WeightCast`. They stay with the layers after the forward, so a
    gradient-checkpoint recomputation (in the backward) computes exactly what the forward did; they
    are replaced at the next decoder forward and ignored once stale (see :func:`adapter_weights`).
    """
    base = base_of(peft_model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = list(layers)
    if not isinstance(decoder, nn.Module) or not layers:
        return

    for module in layers:
        setattr(module, WEIGHTS_ATTR, {})
    decoder.register_forward_pre_hook(_DecoderCasts(layers), with_kwargs=True)


class _DecoderCasts:
    """The decoder's forward pre-hook of :func:`cast_adapter_weights`.

    The (layer, adapter) pairs and their weights are looked up again only when the layers' active
    adapters change, and the NLS mask versions are read once per forward: host time a launch-bound
    GPU step waits for (with torch's C++ flatten in :class:`_CastAll` too; measured in
    ``bench/results/2026-11-28-2123-host-overhead-ab-bf16cpu-vm.json``).
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.active: tuple | None = None
        self.pairs: list[tuple[nn.Module, str]] = []
        self.a_weights: list[torch.Tensor] = []
        self.b_weights: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []  # every A, then every B: _CastAll's order
        # The stacked NLS rank masks and the mask versions they were built at: one sub-adapter serves
        # every forward of a step (accumulation passes, evaluation), so they are built once per draw.
        self.b_mask: torch.Tensor | None = None
        self.b_mask_key: tuple | None = None

    def _refresh(self) -> None:
        active = tuple(tuple(m.active_adapters) for m in self.layers)
        if active != self.active:
            self.active = active
            self.pairs = [(m, a) for m in self.layers for a in m.active_adapters if a in m.lora_A]
            self.a_weights = [m.lora_A[a].weight for m, a in self.pairs]
            self.b_weights = [m.lora_B[a].weight for m, a in self.pairs]
            self.weights = self.a_weights + self.b_weights
            self.b_mask_key = None

    def _autocast_on(self) -> bool:
        return torch.is_autocast_enabled(self.weights[0].device.type)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Without autocast (known once the weights were looked up) nothing is looked up at all.
        if getattr(module, COMPILED_ATTR, False) or (self.weights and not self._autocast_on()):
            return
        self._refresh()
        weights, pairs = self.weights, self.pairs
        if not pairs or not self._autocast_on() or any(w.dtype != weights[0].dtype for w in weights):
            return
        mask_versions = [nls_mask_version(m) for m, _ in pairs]
        key = (*mask_versions, weights[0].device)  # a moved controller starts its version count again
        if key != self.b_mask_key:
            self.b_mask_key = key
            self.b_mask = None if all(v < 0 for v in mask_versions) else _b_masks(pairs, self.b_weights)
        b_mask = self.b_mask
        casts = _CastAll.apply(torch.get_autocast_dtype(weights[0].device.type), b_mask, len(pairs), *weights)
        for i, ((layer, adapter), a, b) in enumerate(zip(pairs, self.a_weights, self.b_weights, strict=True)):
            cast = WeightCast(casts[i], casts[len(pairs) + i], b_mask is not None, _key(a, b, mask_versions[i]), (a, b))
            getattr(layer, WEIGHTS_ATTR)[adapter] = cast


def _b_masks(pairs, b_weights: list[torch.Tensor]) -> torch.Tensor | None:
    """Each B's NLS rank-mask row repeated over its rows, all stacked: ``[sum of B rows, r]``; or
    ``None`` with ranks that differ between adapters, where rows can't stack (called under NLS only)."""
    if len({b.shape[1] for b in b_weights}) != 1:
        return None
    rows = []
    for (module, _), b in zip(pairs, b_weights, strict=True):
        row = nls_rank_mask(module, b)
        rows.append((row if row is not None else b.new_ones(b.shape[1])).expand(b.shape[0], -1))
    return torch.cat(rows)
