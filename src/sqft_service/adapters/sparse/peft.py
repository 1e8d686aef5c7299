"""SparsePEFT: sparsity-preserving LoRA on a pruned base (SQFT, arXiv 2410.03750, Sec. 3.2).

On a sparse base weight ``W`` with non-zero mask ``M = (W != 0)``, SparsePEFT computes with
``W + M * (scaling * B @ A)``: the adapter update is masked like the base, so merging it keeps every
zero of ``W`` exactly (a merged model stays as sparse as the pruned base) and what is trained is what
is deployed. ``M`` is computed once, when SparsePEFT is enabled, and kept as a non-persistent bool
buffer (never written to the adapter checkpoint, never re-derived per step).

Stock PEFT's ``lora.Linear.forward`` computes ``base(x) + B(A(dropout(x))) * scaling``; its
``LoraVariant`` protocol only adds to the base result, so it can't express a fused weight. We swap the
class of each ``lora.Linear`` instance for a subclass that overrides ``forward`` and
``get_delta_weight`` (so PEFT's own ``merge``/``unmerge``/``merge_and_unload`` use the masked delta):

* fused path: one ``F.linear(x, W + M * delta)``; used when the adapter dropout is inactive
  (``lora_dropout == 0`` or eval mode). Computed in the base weight's dtype, exactly as the merged
  model will compute;
* dropout path (training with ``lora_dropout > 0``): LoRA dropout only perturbs the adapter branch
  input, which a single fused weight can't express, so it is ``base(x) + F.linear(dropout(x), M * delta)``.

Under NLS the delta is ``B @ diag(m) @ A`` with the controller's rank-mask row ``m`` (the fused path
does not call ``lora_A``, so it reads the mask directly instead of relying on the hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn

from ..autocast import INPUT_CAST_ATTR, SharedInputCast, adapter_operands, autocast_input, cast_adapter_weights
from ..nls.controller import nls_rank_mask
from ..peft_utils import base_of

MASK_BUFFER = "sqft_sparse_mask"


class SparseLoraLinear(lora_layer.Linear):
    """A ``peft.tuners.lora.Linear`` whose adapter delta is masked by the base's non-zero pattern.

    Never constructed directly: :func:`enable_sparse_peft` switches the class of existing instances.
    """

    # The forward adds the masked delta to the exact base weight; a base stored in bf16 would round
    # W before the sum (training.precision.cast_frozen_linears leaves such bases alone).
    exact_base_weight = True

    def masked_delta(self, adapter: str) -> torch.Tensor:
        """``M * (scaling * B @ diag(m)) @ A`` (``m``: NLS rank mask, or all ones).

        In the adapter dtype, or the autocast dtype under autocast. The scale and the rank mask go on
        ``B`` (out x r), not on the out x in product, and the bool mask ``M`` multiplies in-kernel: the
        only weight-sized kernels are the product and the mask.
        """
        autocast = torch.is_autocast_enabled(self.lora_A[adapter].weight.device.type)
        weight_a, weight_b, masked = adapter_operands(self, adapter, autocast)
        rank_mask = None if masked else nls_rank_mask(self, weight_b)
        scale = self.scaling[adapter] if rank_mask is None else rank_mask * self.scaling[adapter]
        return ((weight_b * scale) @ weight_a) * getattr(self, MASK_BUFFER)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The masked delta, used by PEFT's merge/unmerge (keeps the base's zeros exactly)."""
        return self.masked_delta(adapter)

    def _base_kwargs(self, x: torch.Tensor, args: tuple, kwargs: dict) -> dict:
        """``kwargs`` checked as PEFT's forward checks them, less the adapter-only keys the base can't take."""
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support mixed-adapter batches (adapter_names)")
        for key in lora_layer.VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        return kwargs

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kwargs = self._base_kwargs(x, args, kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight
        fused, with_dropout = [], []
        for adapter in active:
            dropout = self.lora_dropout[adapter]
            live = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
            (with_dropout if live else fused).append(adapter)
        for adapter in fused:
            weight = weight + self.masked_delta(adapter).to(weight.dtype)
        x, autocast = autocast_input(self, x)  # as FusedLoraLinear: one cast shared by q, k and v
        result = F.linear(x, weight, base.bias)
        if not with_dropout:
            return result
        shape = result.shape
        out = result.reshape(-1, shape[-1])
        for adapter in with_dropout:
            delta = self.masked_delta(adapter)
            x_lora = x if autocast else self._cast_input_dtype(x, delta.dtype)
            dropped = self.lora_dropout[adapter](x_lora)
            dropped = dropped.reshape(-1, dropped.shape[-1])
            out = torch.addmm(out if autocast else out.to(delta.dtype), dropped, delta.t())
        return out.reshape(shape).to(result.dtype)


@dataclass
class SparseAdapter:
    """Handle of SparsePEFT on one PEFT model.

    Attributes:
        modules: Module name (relative to the base model) -> the switched LoRA layer.
    """

    modules: dict[str, SparseLoraLinear] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Module name -> bool non-zero mask of its base weight."""
        return {name: getattr(m, MASK_BUFFER) for name, m in self.modules.items()}

    def density(self) -> dict[str, float]:
        """Module name -> fraction of base weights that may change (non-zero in the base)."""
        return {name: float(mask.float().mean()) for name, mask in self.masks.items()}

    def remove(self) -> None:
        """Restore the stock ``lora.Linear`` class and drop the masks (unmasked LoRA again)."""
        for module in self.modules.values():
            if module.merged:
                module.unmerge()
            module.__class__ = lora_layer.Linear
            delattr(module, MASK_BUFFER)
        self.modules.clear()


def enable_sparse_peft(peft_model: nn.Module, adapter: str = "default") -> SparseAdapter:
    """Switch every LoRA ``Linear`` of ``peft_model`` to the SparsePEFT computation.

    Must run before any merge (the mask is taken from the current, unmerged base weight).

    Args:
        peft_model: A ``PeftModel`` with plain LoRA adapters on ``nn.Linear`` layers.
        adapter: The adapter name to check.

    Returns:
        The :class:`SparseAdapter` handle.

    Raises:
        ValueError: For layers SparsePEFT can't handle (merged, DoRA/variants, lora_bias,
            fan_in_fan_out or non-``nn.Linear`` base layers).
    """
    handle = SparseAdapter()
    cast = SharedInputCast()
    for name, module in base_of(peft_model).named_modules():
        if not isinstance(module, lora_layer.Linear) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        problem = None
        if module.merged:
            problem = "is merged"
        elif module.lora_variant:
            problem = "uses a LoRA variant (DoRA, ...)"
        elif any(module.lora_bias.values()):
            problem = "uses lora_bias"
        elif module.fan_in_fan_out or type(base) is not nn.Linear:
            problem = f"wraps a {type(base).__name__} (only nn.Linear is supported)"
        if problem:
            raise ValueError(f"SparsePEFT can't be enabled on {name!r}: it {problem}")
        if not isinstance(module, SparseLoraLinear):
            module.register_buffer(MASK_BUFFER, base.weight.detach() != 0, persistent=False)
            module.__class__ = SparseLoraLinear
            setattr(module, INPUT_CAST_ATTR, cast)
        handle.modules[name] = module
    if not handle.modules:
        raise ValueError(f"SparsePEFT found no LoRA linear layer with adapter {adapter!r}")
    cast_adapter_weights(peft_model, handle.modules.values())
    return handle
