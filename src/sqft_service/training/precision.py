"""Mixed precision: which autocast dtype a job gets on its device, and a low-precision frozen base.

On a CUDA GPU, bf16 (Ampere and later) and fp16 run on the tensor cores. On a CPU,
bf16/fp16 autocast only pays on CPUs that run those matmuls natively (AVX512-BF16/AMX,
AVX512-FP16/AMX-FP16). Elsewhere PyTorch emulates them, one to two orders of magnitude slower
than fp32 (1.3 vs 144 GFLOP/s on our AVX2 EPYC), so a job that asks for them falls back to fp32
with a warning.

Under autocast every ``F.linear`` casts its fp32 weight to the autocast dtype on each call, forward
and again for the backward GEMM: for a frozen base that is the same conversion of ~all the model's
weights every micro-batch, plus a second copy of them in memory while it lives. Storing the frozen
linear weights in the autocast dtype once (:func:`cast_frozen_linears`) removes both, and the
arithmetic does not change: autocast would have rounded the same fp32 weight to the same bf16 value
before the matmul. Trainable adapter weights stay fp32 (the optimizer's master copy); norms and the
embedding stay fp32 because autocast runs them in fp32 too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def native_bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX via oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def native_fp16_supported() -> bool:
    """Whether this CPU runs fp16 matmuls natively (AVX512-FP16 / AMX-FP16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def cuda_bf16_supported() -> bool:
    """Whether the current CUDA GPU runs bf16 natively (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(mixed_precision: str, warn: Callable[[str], None], device_type: str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``Training.mixed_precision`` on ``device_type``, or ``None`` (fp32).

    "auto" is bf16 where the device runs it natively and fp32 elsewhere, silently. An explicit
    "bf16"/"fp16" the device cannot run natively falls back to fp32 with a ``warn`` (every CUDA GPU
    runs fp16). Looks the probes up at call time so tests can stand in for other hardware.
    """
    if device_type == "cuda":
        native = {
            "bf16": (torch.bfloat16, cuda_bf16_supported, "a GPU with bf16 (compute capability 8.0+)"),
            "fp16": (torch.float16, lambda: True, ""),
        }
    else:
        native = {
            "bf16": (torch.bfloat16, native_bf16_supported, "AVX512-BF16/AMX"),
            "fp16": (torch.float16, native_fp16_supported, "AVX512-FP16/AMX-FP16"),
        }
    if mixed_precision == "auto":
        dtype, supported, _ = native["bf16"]
        return dtype if supported() else None
    if mixed_precision not in native:
        return None
    dtype, supported, isa = native[mixed_precision]
    if supported():
        return dtype
    where = "GPU" if device_type == "cuda" else "CPU"
    warn(
        f"mixed_precision {mixed_precision!r} asked, but this {where} has no native {mixed_precision} matmul "
        f"({isa}): training in fp32 instead"
    )
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How the job's events name a precision: "bf16 autocast", "fp16 autocast" or "fp32"."""
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "fp32")


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen ``nn.Linear`` weight (and bias) of ``model`` in ``dtype``; returns bytes saved.

    Skipped: trainable layers (adapters); weights shared with an ``nn.Embedding`` (a tied lm_head),
    because the embedding lookup runs in fp32 under autocast and must keep doing so; and the base of
    a layer that declares ``exact_base_weight`` (SparsePEFT computes with ``W + M * delta``, which
    autocast casts anew each call anyway, and a bf16 ``W`` would be rounded before the sum).
    Only call this when the model runs under ``torch.autocast(dtype=dtype)``: without autocast a
    frozen bf16 layer would meet fp32 inputs.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    exact = {id(m.get_base_layer()) for m in model.modules() if getattr(m, "exact_base_weight", False)}
    saved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in embedded or id(module) in exact:
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or param.dtype == dtype or not param.is_floating_point():
                continue
            saved += param.numel() * (param.element_size() - dtype.itemsize)
            param.data = param.data.to(dtype)
    return saved


@contextmanager
def head_cast_once(lm: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """While generating under autocast: ``lm``'s lm_head (its output embeddings) in ``dtype`` cast once.

    A tied head stays fp32 (:func:`cast_frozen_linears` skips it), so autocast casts its whole
    ``vocab x hidden`` weight anew for every generated token, the largest cast of a decoding step
    (README, "Reinforcement fine-tuning", measures it). Generation changes no weight, so one cast
    serves every step; the logits are the same, autocast would have rounded the weight to the same
    values. No-op without autocast, or for a head that is not a plain ``nn.Linear`` (an adapted one).
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if dtype is None or type(head) is not nn.Linear or head.weight.dtype == dtype:
        yield
        return
    weight = head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    head.forward = lambda hidden: F.linear(hidden.to(dtype), weight, bias)  # an instance attribute: __call__ uses it
    try:
        yield
    finally:
        del head.forward
