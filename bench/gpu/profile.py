"""What limits a row: a ``torch.profiler`` capture of a few steps after the timed window, reduced to shares.

The timed window runs without the profiler (it adds host work per kernel). Then ``PROFILED_STEPS``
more steps run under it, and the kernels' own device time is split into GEMMs, attention and the
rest (element-wise, norms, softmax, copies, optimizer), against the steps' wall time:

- ``launch-bound``: the GPU is busy less than ``BUSY_FLOOR`` of the wall time, so the host (Python,
  kernel launches, synchronisations) sets the pace;
- ``GEMM-bound``: matrix products take at least half of the kernel time;
- ``memory-bound``: otherwise: the time goes to kernels that stream memory more than they compute.

On a CPU (``--tiny``) the same split is made over the ``aten`` operators' own CPU time, without
the busy figure (the host is the device there).
"""

from __future__ import annotations

import time
from typing import Any

PROFILED_STEPS = 2
BUSY_FLOOR = 0.6
TOP = 6
_GEMM = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_ATTENTION = ("flash", "fmha", "attention", "efficient_attention", "scaled_dot_product")


def kind(name: str) -> str:
    lower = name.lower()
    if any(k in lower for k in _ATTENTION):
        return "attention"
    if any(k in lower for k in _GEMM):
        return "gemm"
    return "other"


class Capture:
    """Profiles the steps ``first .. first + PROFILED_STEPS - 1`` (call ``begin``/``end`` around them)."""

    def __init__(self, device: str, first: int) -> None:
        self.device, self.first, self.last = device, first, first + PROFILED_STEPS - 1
        self.summary: dict[str, Any] | None = None
        self._prof = None
        self._t0 = 0.0

    def begin(self, step: int) -> None:
        if step != self.first:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if step != self.last or self._prof is None:
            return
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.summary = summarize(self._prof.key_averages(), self.device, wall)
        self._prof = None


def summarize(events, device: str, wall_s: float) -> dict[str, Any]:
    """Shares of kernel (or operator) time by kind, the top entries, and the verdict on what limits the step."""
    from torch.autograd import DeviceType

    if device == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        timed = [(e.key, e.self_device_time_total) for e in kernels]
        # Kernel launches per step: what a launch-bound row pays for (bench/gpu/launches.py is the CPU proxy).
        launches = round(sum(e.count for e in kernels) / PROFILED_STEPS, 1)
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
        launches = None
    total_us = sum(t for _, t in timed) or 1.0
    shares = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, t in timed:
        shares[kind(name)] += t / total_us
    top = sorted(timed, key=lambda item: item[1], reverse=True)[:TOP]
    summary: dict[str, Any] = {
        "steps": PROFILED_STEPS,
        "wall_s": round(wall_s, 4),
        "kernel_s": round(total_us / 1e6, 4),
        "kernels_per_step": launches,
        "shares": {k: round(v, 3) for k, v in shares.items()},
        "top": [{"name": name[:120], "share": round(t / total_us, 3)} for name, t in top],
    }
    busy = total_us / 1e6 / wall_s if device == "cuda" and wall_s > 0 else None
    summary["gpu_busy"] = round(busy, 3) if busy is not None else None
    if busy is not None and busy < BUSY_FLOOR:
        summary["limit"] = "launch-bound"
    elif shares["gemm"] >= 0.5:
        summary["limit"] = "GEMM-bound"
    else:
        summary["limit"] = "memory-bound"
    return summary


def describe(row: dict[str, Any]) -> str | None:
    """One line for the markdown report, or None when the row has no profile."""
    p = row.get("profile")
    if not p:
        return None
    busy = f"GPU busy {p['gpu_busy']:.0%}, " if p.get("gpu_busy") is not None else ""
    if p.get("kernels_per_step"):
        busy += f"{p['kernels_per_step']:.0f} kernels/step, "
    s = p["shares"]
    top = ", ".join(f"{t['name'][:48]} {t['share']:.0%}" for t in p["top"][:3])
    return (
        f"- {row['row']} {row['setup']}: **{p['limit']}** ({busy}GEMM {s['gemm']:.0%}, attention "
        f"{s['attention']:.0%}, other {s['other']:.0%}; top: {top})"
    )
