"""QA-SparsePEFT: SparsePEFT trained through the quantizer of the base (SQFT, arXiv 2410.03750, Sec. 3.3).

Each adapted weight ``W`` of the sparse base gets a group-wise quantizer ``Q`` (``quantizer.GroupQuantizer``,
RTN on ``W``, or GPTQ's on a base that ``gptq.py`` quantized, then ``W`` is its ``W~``; parameters then
fixed), and the layer computes with

    ``Q(W + M * scaling * B @ A)``

(``M`` = non-zero mask of ``W``, as SparsePEFT). With ``B = 0`` that is ``Q(W)``, the quantized sparse
base; the forward is always the exact quantize-dequantize of the merged weight, so :meth:`merge` stores
the same integers the trained model computed with: one INT``bits`` model, as sparse as the base, with
no accuracy lost between training and deployment. Gradients reach ``A`` and ``B`` straight through the
rounding (inside each group's range).

SQFT adds the adapter to the *dequantized* base, ``Q(Q(W) + ...)``: its base comes from GPTQ, whose
float weights are gone. Here ``W`` is at hand, and the sum is taken on it: ``Q(W)`` sits at the centre
of every code's interval, so an update moves no code until it exceeds half a step, and the adapter
barely trained (``bench/qa_sparse.py``, figures in the README). Both start from the same ``Q(W)`` and
give the same kind of model.

The layer is :class:`~sqft_service.adapters.sparse.SparseLoraLinear` with its fused path only: LoRA
dropout perturbs the adapter's input, which a weight inside a quantizer can't express, so
quantization-aware training is refused with ``lora_dropout > 0`` (config.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..autocast import autocast_input
from ..peft_utils import lora_layers
from ..sparse.peft import SparseAdapter, SparseLoraLinear, enable_sparse_peft
from .gptq import quantized_base_of
from .quantizer import GroupQuantizer, load_quantizers, save_quantizers

QUANT_FILE = "sqft_quantization.safetensors"  # beside the adapter: the base's scales and zero points
QUANT_METHOD = "rtn-minmax-asymmetric-f16scales"  # the file's `method`: RTN, float16-exact scales
SCALE_BUFFER = "sqft_quant_scale"
ZERO_BUFFER = "sqft_quant_zero"


class QuantSettingError(ValueError):
    """A QA setting the user can change does not fit the model; ``param`` names it (``quantization_bits``, ...)."""

    def __init__(self, message: str, param: str = "quantization_group_size") -> None:
        super().__init__(message)
        self.param = param


class QuantAwareSparseLoraLinear(SparseLoraLinear):
    """A SparsePEFT layer whose merged weight goes through the base's fixed fake quantizer.

    Never constructed directly: :func:`enable_quantization_aware` switches the class of SparsePEFT layers.
    """

    quant_bits: int
    quant_group_size: int

    @property
    def quantizer(self) -> GroupQuantizer:
        return GroupQuantizer(
            getattr(self, SCALE_BUFFER), getattr(self, ZERO_BUFFER), self.quant_bits, self.quant_group_size
        )

    def quantized_weight(self, adapters: list[str]) -> torch.Tensor:
        """``Q(W + M * delta)`` over ``adapters``, in the base weight's dtype.

        The delta is made in the adapter's dtype even under autocast: a bf16 delta would round some
        weights across a code boundary that the merge (no autocast) would not, and the merged integers
        must be the trained ones. Only ``F.linear`` runs in the autocast dtype.
        """
        weight = self.get_base_layer().weight
        merged = weight
        with torch.autocast(weight.device.type, enabled=False):
            for adapter in adapters:
                merged = merged + self.masked_delta(adapter).to(weight.dtype)
        return self.quantizer.fake_quantize(merged).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kwargs = self._base_kwargs(x, args, kwargs)
        if self.disable_adapters and self.merged:
            self.unmerge()  # raises: the base is gone from a quantized merge (never its output silently)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or self.disable_adapters or not active:
            # Merged: the base weight is Q(W + M * delta) itself. Disabled: the base as loaded.
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        x, _ = autocast_input(self, x)
        return F.linear(x, self.quantized_weight(active), base.bias)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``Q(W + M * delta) - W``; :meth:`merge` writes ``Q(W + M * delta)`` itself (exact)."""
        weight = self.get_base_layer().weight
        return self.quantized_weight([adapter]) - weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Store ``Q(W + M * delta)`` in the base weight: the integers the trained layer computed with.

        PEFT's merge adds ``get_delta_weight`` to ``W``; ``W + (Q - W)`` is not always ``Q`` in floating
        point, so the quantized weight is written directly.
        """
        adapters = check_adapters_to_merge(self, adapter_names)
        if not adapters:
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            merged = self.quantized_weight(adapters)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError("NaNs detected in the merged weights; the adapter seems broken")
            weight.data = merged
        self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        raise ValueError("a quantized merge can't be undone (rounding is not invertible); reload the base")


@dataclass
class QuantAwareAdapter:
    """Handle of QA-SparsePEFT on one PEFT model.

    Attributes:
        sparse: The SparsePEFT handle (masks) under it.
        bits: Bits per weight code.
        group_size: Inputs per scale.
        modules: Module name (relative to the base model) -> the switched layer.
    """

    sparse: SparseAdapter
    bits: int
    group_size: int
    modules: dict[str, QuantAwareSparseLoraLinear] = field(default_factory=dict)

    def quantizers(self) -> dict[str, GroupQuantizer]:
        return {name: m.quantizer for name, m in self.modules.items()}

    def save(self, directory: str | Path, once_at: Path | None = None) -> Path:
        """Write the scales and zero points beside a saved adapter (:data:`QUANT_FILE`).

        ``once_at``: a file kept across saves. The quantizers never change during training, so the file
        is written there once and hard-linked into each checkpoint (5 bytes per 64 weights: ~0.4 GB for
        an 8B model's projections, by arithmetic; a copy where links fail).
        """
        target = Path(directory) / QUANT_FILE
        if once_at is None:
            return save_quantizers(target, self.quantizers(), method=QUANT_METHOD)
        if not once_at.is_file():
            partial = once_at.with_name(once_at.name + ".partial")
            save_quantizers(partial, self.quantizers(), method=QUANT_METHOD)
            partial.replace(once_at)
        target.unlink(missing_ok=True)
        try:
            os.link(once_at, target)
        except OSError:
            shutil.copyfile(once_at, target)
        return target


def saved_quantizers(adapter_dir: str | Path) -> dict[str, GroupQuantizer] | None:
    """The quantizers saved beside a QA-SparsePEFT adapter, or ``None`` for any other adapter."""
    path = Path(adapter_dir) / QUANT_FILE
    return load_quantizers(path)[0] if path.is_file() else None


def enable_quantization_aware(
    peft_model: nn.Module,
    bits: int,
    group_size: int,
    quantizers: dict[str, GroupQuantizer] | None = None,
    adapter: str = "default",
) -> QuantAwareAdapter:
    """SparsePEFT on ``peft_model``, computed through a fixed quantizer of each base weight.

    Args:
        peft_model: A ``PeftModel`` with unmerged LoRA adapters on the sparse base's linears.
        bits: Bits per code.
        group_size: Inputs per scale; must divide every adapted layer's input size.
        quantizers: Saved parameters to use (a merge of a trained adapter); when ``None``, a GPTQ base's
            (``gptq.QUANTIZED_BASE_FILE``), else fitted by RTN. On a GPTQ base the adapted layers
            compute from its ``W~`` either way.
        adapter: The adapter name.

    Raises:
        QuantSettingError: A layer whose input size ``group_size`` does not divide, or ``bits`` /
            ``group_size`` that differ from a GPTQ base's.
        ValueError: A dropout that is live, or saved quantizers that do not cover the adapted layers.
    """
    gptq = quantized_base_of(peft_model)
    if gptq is not None and quantizers is None and (gptq.bits, gptq.group_size) != (bits, group_size):
        param = "quantization_bits" if gptq.bits != bits else "quantization_group_size"
        raise QuantSettingError(
            f"the base was quantized by GPTQ to {gptq.bits} bits in groups of {gptq.group_size}; "
            f"QA-SparsePEFT on it trains with those: set `quantization_bits` {gptq.bits} and "
            f"`quantization_group_size` {gptq.group_size}",
            param,
        )
    if gptq is not None:
        # Train (or merge) on W~, whose rounding is the GPTQ weight the base holds; before the masks are
        # taken, so they are the pruning's (a kept weight that rounds to 0 stays trainable).
        for name, layer in lora_layers(peft_model, adapter):
            if name in gptq:
                weight = layer.get_base_layer().weight
                weight.data = gptq.float_weight(name).to(weight.device, weight.dtype)
    sparse = enable_sparse_peft(peft_model, adapter)
    handle = QuantAwareAdapter(sparse=sparse, bits=bits, group_size=group_size)
    for name, module in sparse.modules.items():
        weight = module.get_base_layer().weight
        if weight.shape[1] % group_size:
            raise QuantSettingError(
                f"`quantization_group_size` {group_size} does not divide the {weight.shape[1]} inputs of {name!r}"
            )
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError("QA-SparsePEFT trains without LoRA dropout: set `lora_dropout` to 0")
        if quantizers is not None and name in quantizers:
            quantizer = quantizers[name]
        elif quantizers is not None:
            raise ValueError(f"the saved quantization parameters have no entry for {name!r}")
        elif gptq is not None and name in gptq:
            quantizer = gptq.quantizer(name)
        else:
            quantizer = GroupQuantizer.fit(weight, bits, group_size)
        module.register_buffer(SCALE_BUFFER, quantizer.scale.to(weight.device), persistent=False)
        module.register_buffer(ZERO_BUFFER, quantizer.zero.to(weight.device), persistent=False)
        module.quant_bits, module.quant_group_size = bits, group_size
        module.__class__ = QuantAwareSparseLoraLinear
        handle.modules[name] = module
    return handle
