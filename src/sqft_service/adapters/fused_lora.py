"""Plain LoRA with the adapter's scale-and-add folded into one GEMM.

Stock peft computes ``result = result + lora_B(lora_A(dropout(x))) * scaling``: the rank-r GEMM
writes a temporary, ``* scaling`` writes another, ``+`` a third, each the size of the layer's
output, and autograd keeps the intermediates. ``torch.addmm(result, h, B.T, alpha=scaling)`` does
the same arithmetic in one pass (BLAS ``C = beta*C + alpha*A@B``). Everything else (dropout, the
NLS rank mask, merge, saving) is stock peft's: only ``forward`` changes, and only for the plain
path; any other case defers to peft.

Under autocast the layer also casts less (each cast is a kernel forward and one backward, which is what
a launch-bound GPU step pays for; ``bench/gpu/launches.py`` counts them). Autocast casts a layer's
input for every matmul that reads it and caches only casts of weights, so q, k and v, each with its
adapter, would cast the same activation six times: one :class:`SharedInputCast` per model makes it once.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn

from .nls.controller import nls_rank_mask

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


class FusedLoraLinear(lora_layer.Linear):
    """A ``peft.tuners.lora.Linear`` whose training forward uses ``addmm``.

    Never constructed directly: :func:`fuse_lora_layers` switches the class of existing instances.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = (
            not args
            and not kwargs
            and not self.disable_adapters
            and not self.merged
            and not self.lora_variant
            and not any(getattr(self, "lora_bias", {}).values())
        )
        if not plain:
            return super().forward(x, *args, **kwargs)
        # Under autocast every matmul here runs in its dtype whatever its inputs' dtypes, so x is cast
        # once (shared with sibling layers) and the base's output goes in as it is: casting them to the
        # adapter's fp32 first (what peft does) only makes autocast cast them back. Without autocast the
        # dtypes must agree, so they are cast to the adapter's.
        x, autocast = autocast_input(self, x)
        result = self.base_layer(x)
        shape = result.shape
        out = result.reshape(-1, shape[-1])
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            weight_b = self.lora_B[adapter].weight
            dropped = self.lora_dropout[adapter](x if autocast else x.to(weight_b.dtype))
            # lora_A's own forward without its module call: no hooks to run, so NLS's rank mask (a hook
            # on lora_A for peft's path) is applied here.
            h = F.linear(dropped, self.lora_A[adapter].weight)
            rank_mask = nls_rank_mask(self, h)
            if rank_mask is not None:
                h = h * rank_mask
            out = torch.addmm(out if autocast else out.to(weight_b.dtype), h.reshape(-1, h.shape[-1]), weight_b.t(),
                              alpha=self.scaling[adapter])  # fmt: skip
        return out.reshape(shape).to(result.dtype)


def fuse_lora_layers(peft_model: nn.Module) -> int:
    """Switch every stock ``lora.Linear`` (exact type) in ``peft_model`` to :class:`FusedLoraLinear`."""
    switched = 0
    cast = SharedInputCast()
    for module in peft_model.modules():
        if type(module) is lora_layer.Linear:
            module.__class__ = FusedLoraLinear
            setattr(module, INPUT_CAST_ATTR, cast)
            switched += 1
    return switched
