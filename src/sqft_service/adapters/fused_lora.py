"""Plain LoRA with the adapter's scale-and-add folded into one GEMM.

Stock peft computes ``result = result + lora_B(lora_A(dropout(x))) * scaling``: the rank-r GEMM
writes a temporary, ``* scaling`` writes another, ``+`` a third, each the size of the layer's
output, and autograd keeps the intermediates. ``torch.addmm(result, h, B.T, alpha=scaling)`` does
the same arithmetic in one pass (BLAS ``C = beta*C + alpha*A@B``). Everything else (dropout, the
NLS rank mask, merge, saving) is stock peft's: only ``forward`` changes, and only for the plain
path; any other case defers to peft.

Under autocast the layer also casts less (:mod:`sqft_service.adapters.autocast`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn

from .autocast import INPUT_CAST_ATTR, SharedInputCast, adapter_operands, autocast_input, cast_adapter_weights
from .nls.controller import nls_rank_mask


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
            weight_a, weight_b, masked = adapter_operands(self, adapter, autocast)
            dropped = self.lora_dropout[adapter](x if autocast else x.to(weight_b.dtype))
            # lora_A's own forward without its module call: no hooks to run, so NLS's rank mask (a hook
            # on lora_A for peft's path) is applied here, unless the cast B already carries it.
            h = F.linear(dropped, weight_a)
            rank_mask = None if masked else nls_rank_mask(self, h)
            if rank_mask is not None:
                h = h * rank_mask
            out = torch.addmm(out if autocast else out.to(weight_b.dtype), h.reshape(-1, h.shape[-1]), weight_b.t(),
                              alpha=self.scaling[adapter])  # fmt: skip
        return out.reshape(shape).to(result.dtype)


def fuse_lora_layers(peft_model: nn.Module) -> int:
    """Switch every stock ``lora.Linear`` (exact type) in ``peft_model`` to :class:`FusedLoraLinear`."""
    switched = []
    cast = SharedInputCast()
    for module in peft_model.modules():
        if type(module) is lora_layer.Linear:
            module.__class__ = FusedLoraLinear
            setattr(module, INPUT_CAST_ATTR, cast)
            switched.append(module)
    if switched:
        cast_adapter_weights(peft_model, switched)
    return len(switched)
