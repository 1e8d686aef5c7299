"""Plain LoRA with the adapter's scale-and-add folded into one GEMM.

Stock peft computes ``result = result + lora_B(lora_A(dropout(x))) * scaling``: the rank-r GEMM
writes a temporary, ``* scaling`` writes another, ``+`` a third, each the size of the layer's
output, and autograd keeps the intermediates. ``torch.addmm(result, h, B.T, alpha=scaling)`` does
the same arithmetic in one pass (BLAS ``C = beta*C + alpha*A@B``). Everything else (dropout, the
NLS rank hook on ``lora_A``, merge, saving) is stock peft's: only ``forward`` changes, and only
for the plain path; any other case defers to peft.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import layer as lora_layer
from torch import nn


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
        result = self.base_layer(x)
        shape = result.shape
        out = result.reshape(-1, shape[-1])
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            weight_b = self.lora_B[adapter].weight
            h = self.lora_A[adapter](self.lora_dropout[adapter](x.to(weight_b.dtype)))
            out = torch.addmm(out.to(weight_b.dtype), h.reshape(-1, h.shape[-1]), weight_b.t(),
                              alpha=self.scaling[adapter])  # fmt: skip
        return out.reshape(shape).to(result.dtype)


def fuse_lora_layers(peft_model: nn.Module) -> int:
    """Switch every stock ``lora.Linear`` (exact type) in ``peft_model`` to :class:`FusedLoraLinear`."""
    switched = 0
    for module in peft_model.modules():
        if type(module) is lora_layer.Linear:
            module.__class__ = FusedLoraLinear
            switched += 1
    return switched
