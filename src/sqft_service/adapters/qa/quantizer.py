"""Group-wise asymmetric integer quantization of a linear weight, and its fake quantizer for training.

A weight ``W`` (out x in) is cut into groups of ``group_size`` consecutive inputs per output row; each
group gets a float scale ``s`` and an integer zero point ``z`` in ``[0, 2**bits - 1]``, and stores
codes ``q = clamp(round(W / s) + z, 0, 2**bits - 1)`` that stand for ``(q - z) * s``. The range of
each group always includes 0 (min/max taken with 0), so a zero weight is the code ``z`` and comes back
as exactly 0: a pruned base stays pruned after quantization (SQFT Sec. 3.3, QA-SparsePEFT).

Each scale is rounded up to a float16 value with few enough significant bits (``11 - bits`` up to 5
bits) that ``s``, ``-s * z`` and ``(q - z) * s`` are exact in float16/float32: GGML's ``Q4_1``/``Q5_1``
blocks (``d * q + m``) then hold the same weights bit for bit (``gguf_export.py``); the grid widens by
at most 2**(bits - 10) of its step.

The parameters are fitted once by round-to-nearest on min/max (RTN) and then kept fixed: training
learns an adapter through the quantizer (``fake_quantize``, straight-through inside the range), and the
same scales and zero points quantize the merged weight, so what trained is what is deployed.

Written here rather than taken from a library: the quantizers of bitsandbytes, optimum/GPTQ and
torchao either quantize a frozen weight for inference only or need their own kernels and CUDA; QA
needs a differentiable quantizer with *fixed* parameters over a weight that changes every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@dataclass
class GroupQuantizer:
    """Scales and zero points of one weight.

    Attributes:
        scale: ``(out, in // group_size)`` float32 scales (1 for a group of zeros).
        zero: ``(out, in // group_size)`` integer zero points, as float32 (exact up to 2**24).
        bits: Bits per code (2 to 8).
        group_size: Consecutive inputs sharing a scale.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @classmethod
    def fit(cls, weight: torch.Tensor, bits: int, group_size: int) -> GroupQuantizer:
        """Round-to-nearest parameters: each group's [min, max] (widened to hold 0) over 2**bits codes."""
        out, inp = weight.shape
        if inp % group_size:
            raise ValueError(f"group size {group_size} does not divide the {inp} inputs of the weight")
        groups = weight.detach().float().reshape(out, inp // group_size, group_size)
        low = groups.amin(-1).clamp(max=0)
        high = groups.amax(-1).clamp(min=0)
        qmax = 2**bits - 1
        scale = (high - low) / qmax
        scale = torch.where(scale > 0, _float16_exact(scale, bits), torch.ones_like(scale))
        zero = torch.round(-low / scale).clamp(0, qmax)
        return cls(scale=scale, zero=zero, bits=bits, group_size=group_size)

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        out, inp = weight.shape
        return weight.float().reshape(out, inp // self.group_size, self.group_size)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``weight`` (uint8, same shape)."""
        levels = _levels(weight, self.scale, self.zero, self.group_size)
        return levels.clamp(0, self.qmax).reshape(weight.shape).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``(q - z) * s`` in float32."""
        scale, zero = self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)
        return ((self._grouped(codes) - zero) * scale).reshape(codes.shape)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(codes(weight))`` in float32, with the straight-through gradient inside the range."""
        return _FakeQuantize.apply(weight, self.scale, self.zero, self.qmax, self.group_size)


# The smallest normal float16; a scale below it would lose significant bits as a subnormal.
_MIN_SCALE = 2.0**-14


def _float16_exact(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale`` rounded up to ``11 - bits`` significant bits (11 from 6 bits on) within float16's normal
    range, so that ``scale * k`` is a float16 for every integer ``0 <= k < 2**bits`` up to 5 bits."""
    significant = 11 - bits if bits <= 5 else 11
    mantissa, exponent = torch.frexp(scale.clamp(min=_MIN_SCALE))  # scale = mantissa * 2**exponent, [0.5, 1)
    return torch.ldexp(torch.ceil(torch.ldexp(mantissa, torch.tensor(significant))), exponent - significant)


def _levels(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``round(W / s) + z`` per group, before clamping to the codes: ``(out, in // group_size, group_size)``."""
    out, inp = weight.shape
    groups = weight.float().reshape(out, inp // group_size, group_size)
    return torch.round(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1)


class _FakeQuantize(torch.autograd.Function):
    """Forward: the exact quantize-dequantize (bit-equal to what the merge stores). Backward: the
    straight-through estimator, passing the gradient where the weight lies inside the group's
    representable range and none where the codes clamp (the usual STE of QAT, e.g. nncf's FakeQuantize)."""

    @staticmethod
    def forward(ctx, weight, scale, zero, qmax: int, group_size: int):
        levels = _levels(weight, scale, zero, group_size)
        ctx.save_for_backward((levels >= 0) & (levels <= qmax))
        ctx.weight_dtype = weight.dtype
        return ((levels.clamp(0, qmax) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(weight.shape)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        grad_in = (grad.reshape(inside.shape) * inside).reshape(grad.shape).to(ctx.weight_dtype)
        return grad_in, None, None, None, None


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """4-bit codes two to a byte (low nibble first along the input axis); other widths one per byte."""
    if bits != 4:
        return codes.to(torch.uint8)
    pairs = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`."""
    if bits != 4:
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def save_quantizers(
    path: Path, quantizers: dict[str, GroupQuantizer], extra: dict[str, torch.Tensor] | None = None, **metadata: str
) -> Path:
    """One safetensors file: per module ``name.scales`` (float32) and ``name.zeros`` (uint8), plus ``extra``
    tensors; ``bits`` and ``group_size`` (shared by all) in its metadata. Read by :func:`load_quantizers`."""
    tensors = dict(extra or {})
    first = next(iter(quantizers.values()))
    for name, q in quantizers.items():
        tensors[f"{name}.scales"] = q.scale.detach().float().cpu().contiguous()
        tensors[f"{name}.zeros"] = q.zero.detach().to(torch.uint8).cpu().contiguous()
    meta = {"bits": str(first.bits), "group_size": str(first.group_size), **metadata}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_quantizers(path: Path) -> tuple[dict[str, GroupQuantizer], dict[str, torch.Tensor]]:
    """The quantizers of a :func:`save_quantizers` file, and all its tensors."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    bits, group_size = int(meta["bits"]), int(meta["group_size"])
    tensors = load_file(str(path))
    names = [key.removesuffix(".scales") for key in tensors if key.endswith(".scales")]
    quantizers = {
        name: GroupQuantizer(tensors[f"{name}.scales"], tensors[f"{name}.zeros"].float(), bits, group_size)
        for name in names
    }
    return quantizers, tensors
