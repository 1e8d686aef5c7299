"""Micro-benchmarks run in their own child processes: the GEMM peak and one SparsePEFT layer."""

from __future__ import annotations

import statistics
import time
from typing import Any


def measure_peaks(threads: int, budget_s: float = 6.0) -> dict[str, float]:
    """Sustained GEMM GFLOP/s for fp32 and bf16: the best of repeated timings of square matmuls.

    Taking the best of several short trials filters out interference from other processes.
    """
    import torch

    torch.set_num_threads(threads)
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (512, 1024, 2048):
            deadline = time.perf_counter() + budget_s / 6  # half the budget per dtype, split over 3 sizes
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            t0 = time.perf_counter()
            a @ b  # warm-up, and a probe: an emulated dtype stops here
            first = time.perf_counter() - t0
            best = max(best, 2 * n**3 / first / 1e9)
            if first > budget_s / 6:
                break
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        peaks[name] = round(best, 1)
    return peaks


def peaks_row(spec: dict[str, Any]) -> dict[str, Any]:
    from sqft_service.training.precision import native_bf16_supported

    budget = 4.0 if spec["quick"] else 6.0
    return {"name": "peaks", **measure_peaks(spec["threads"], budget), "native_bf16": native_bf16_supported()}


def sparse_layer_row(spec: dict[str, Any]) -> dict[str, Any]:
    """One adapted projection (SmolLM2 up_proj shape), forward + backward: three formulations."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tokens, d_in, d_out, r = spec["batch_size"] * 64, 576, 1536, spec["rank"]
    weight = torch.randn(d_out, d_in) * 0.02
    weight[weight.abs() < weight.abs().median()] = 0.0  # 50% sparse base
    mask = weight != 0
    a = (torch.randn(r, d_in) * 0.02).requires_grad_()
    b = (torch.randn(d_out, r) * 0.02).requires_grad_()
    scale = 2.0
    x0 = torch.randn(tokens, d_in)

    def fused(x):  # ours: one matmul with the masked, merged weight
        return F.linear(x, weight + mask * (scale * (b @ a)))

    def two_matmuls(x):  # base matmul + masked-delta matmul
        return F.linear(x, weight) + F.linear(x, mask * (scale * (b @ a)))

    def plain_lora(x):  # unmasked LoRA (not SparsePEFT), for scale
        return F.linear(x, weight) + scale * F.linear(F.linear(x, a), b)

    formulations = {"sparsepeft_fused": fused, "base_plus_masked_delta": two_matmuls, "plain_lora": plain_lora}
    times: dict[str, list[float]] = {k: [] for k in formulations}
    for i in range(spec["reps"] + 2):  # round-robin, so interference hits every formulation alike
        for label, fn in formulations.items():
            x = x0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x).square().mean().backward()
            if i >= 2:
                times[label].append(time.perf_counter() - t0)
            a.grad = b.grad = None
    out = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    return {"name": "sparse_layer", "shape": [tokens, d_in, d_out, r], "ms_fwd_bwd": out}
