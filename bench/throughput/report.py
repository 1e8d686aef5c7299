"""Rows from per-step records, MFU, the markdown tables and the results JSON."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
from datetime import date
from pathlib import Path
from typing import Any

from .inputs import RESULTS, TARGETS
from .runner import peak_rss_mb

BASELINE = "hf_peft_fp32"
REQUIRED = ["name", "real_tokens_per_s", "step_s", "peak_rss_mb", "mfu", "loss_first", "loss_last"]
# Ratios of time per real token printed under the table: (setup, compared with, target).
PAIRS = [
    ("ours_nls", "ours_lora", "<= 1.03"),
    ("ours_sparsepeft", "ours_lora", "<= 1.25"),
    ("ours_sparsepeft_nodropout", "ours_lora_nodropout", "<= 1.25"),
    ("ours_lora_gradckpt", "ours_lora_fp32", "memory option"),
    ("ours_lora_packed", "ours_lora_unsorted", "< 1"),
    ("ours_lora_gsm8k", "hf_peft_fp32_gsm8k", "-"),
]


def summarize(name: str, steps: list[dict[str, float]], warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One row from the per-step records (``seconds``, ``tokens``, ``padded``, ``loss`` each).

    ``real_tokens_per_s`` is the measured steps' real tokens over their time: the rate at which a job
    gets through its data. Length-grouped batches differ in size from step to step (short batches run
    at a lower rate), so the median of per-step rates would weigh a few short batches like the long
    ones; it is kept as ``median_step_tokens_per_s``.
    """
    measured = steps[warmup:] or steps[-1:]
    losses = [s["loss"] for s in steps]
    return {
        "name": name,
        "real_tokens_per_s": round(sum(s["tokens"] for s in measured) / sum(s["seconds"] for s in measured), 2),
        "median_step_tokens_per_s": round(statistics.median(s["tokens"] / s["seconds"] for s in measured), 2),
        "step_s": round(statistics.median(s["seconds"] for s in measured), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_curve": [round(v, 4) for v in losses],
        "step_seconds": [round(s["seconds"], 4) for s in steps],
        "step_tokens": [s["tokens"] for s in steps],
        "steps_measured": len(measured),
        "steps_warmup": min(warmup, len(steps) - len(measured)),
        "tokens_per_step": round(statistics.mean(s["tokens"] for s in measured), 1),
        "padded_tokens_per_step": round(statistics.mean(s.get("padded", s["tokens"]) for s in measured), 1),
        **extra,
    }


def model_flops_per_token(model_dir: str) -> tuple[float, int]:
    """4·N FLOP per trained token with a frozen base (forward 2N + input-gradient 2N), N = matmul params."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * i
    n = n_layers * per_layer + h * cfg.vocab_size  # + lm_head
    return 4.0 * n, n


def complete_row(row: dict[str, Any], peaks: dict[str, Any], flops_per_token: float) -> dict[str, Any]:
    """Every REQUIRED key (None where unknown), plus GFLOP/s and MFU against the matching GEMM peak."""
    for key in REQUIRED:
        row.setdefault(key, None)
    if row.get("real_tokens_per_s"):
        peak = peaks.get("bf16" if row.get("precision") == "bf16" else "fp32") or 0
        row["gflops"] = round(row["real_tokens_per_s"] * flops_per_token / 1e9, 2)
        row["mfu"] = round(row["gflops"] / peak, 4) if peak else None
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_machine_results(kind: str, torch_threads: int, figures: dict[str, Any]) -> Path:
    """Write ``bench/results/<date>-<kind>-<host>.json``: the machine the figures were measured on
    (date, host, CPU, cores, torch threads and version), then ``figures``."""
    import torch

    host = socket.gethostname()
    out = RESULTS / f"{date.today()}-{kind}-{host}.json"
    machine = {
        "date": str(date.today()),
        "host": host,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch_threads,
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({**machine, **figures}, indent=1))
    print(f"wrote {out}")
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = next((r for r in rows if r["name"] == BASELINE and r.get("real_tokens_per_s")), None)
    lines = [
        f"{meta['date']} · {meta['cpu']} · {meta['threads']} threads · {meta['model_name']} · "
        f"r={meta['rank']} {'/'.join(TARGETS)} · batch {meta['batch_size']} · "
        f"GEMM peak fp32 {meta['peaks']['fp32']} / bf16 {meta['peaks']['bf16']} GFLOP/s",
        "",
        "| setup | precision | real tok/s | x hf_peft_fp32 | step s | peak RSS MB | MFU | loss first -> last | note |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        tps = r.get("real_tokens_per_s")
        ratio = f"{tps / base['real_tokens_per_s']:.2f}x" if base and tps else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        loss = f"{fmt(r.get('loss_first'), 3)} -> {fmt(r.get('loss_last'), 3)}" if r.get("loss_first") else "-"
        note = r.get("skipped") or r.get("error") or ""
        lines.append(
            f"| {r['name']} | {r.get('precision', '-')} | {fmt(tps, 1)} | {ratio} | {fmt(r.get('step_s'), 2)} | "
            f"{fmt(r.get('peak_rss_mb'), 0)} | {mfu} | {loss} | {note[:120]} |"
        )
    by_name = {r["name"]: r for r in rows if r.get("step_s")}
    # Time per real token: the same as the step-time ratio on the same batches, and still meaningful
    # where the batches differ (the gsm8k pair).
    ratios = [
        f"| {a} / {b} | {by_name[b]['real_tokens_per_s'] / by_name[a]['real_tokens_per_s']:.2f} | {target} |"
        for a, b, target in PAIRS
        if a in by_name and b in by_name
    ]
    if ratios:
        lines += ["", "| time per real token | measured | target |", "|---|---:|---|", *ratios]
    ours, hf = by_name.get("ours_lora"), by_name.get("hf_peft_fp32_same_order")
    if ours and hf and ours.get("loss_curve") and hf.get("loss_curve"):
        diffs = [abs(a - b) for a, b in zip(ours["loss_curve"], hf["loss_curve"], strict=False)]
        lines += [
            "",
            f"Loss on the same batches, ours_lora vs hf_peft_fp32_same_order: step-1 |diff| {diffs[0]:.4f}, "
            f"max |diff| over {len(diffs)} steps {max(diffs):.4f} (LoRA dropout masks differ between the two)",
        ]
    layer = meta.get("sparse_layer")
    if layer:
        lines += ["", f"SparsePEFT layer, fwd+bwd, tokensxinxoutxr = {'x'.join(map(str, layer['shape']))}:", ""]
        lines += ["| formulation | ms |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in layer["ms_fwd_bwd"].items()]
    return "\n".join(lines)


def write_results(out: Path, day: str, host: str, result: dict[str, Any]) -> tuple[Path, Path]:
    """``<out>/<day>-<host>.json`` and a copy as ``<out>/latest.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{day}-{host}.json"
    path.write_text(json.dumps(result, indent=2))
    latest = out / "latest.json"
    shutil.copyfile(path, latest)
    return path, latest
