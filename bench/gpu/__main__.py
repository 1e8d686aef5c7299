"""Entry point: ``python -m bench.gpu [--tiny] [--rows ...]`` from the repository root (``make bench-gpu``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.throughput.inputs import REPO, RESULTS

from . import __doc__ as package_doc
from .inputs import SHAPES, data_dir, data_file, describe_data, linear_params, tokenizer_dir
from .profile import PROFILED_STEPS, describe

SETUPS = ["hf", "ours_lora", "ours_nls", "ours_sparsepeft"]
# Opt-in (a row's own setups): ours_lora with Training.torch_compile (its first_step_s is the compile
# cost); LoRA and SparsePEFT with lora_dropout 0 (SparsePEFT's fused one-matmul path: with dropout the
# adapter input differs from the base's, so its step runs 5 weight-sized GEMMs where LoRA runs 2).
EXTRA_SETUPS = ["ours_lora_compile", "ours_lora_nodrop", "ours_sparsepeft_nodrop"]
# Every combination of the table: shape x data x batch size.
FULL_ROWS = [
    f"{s}:{d}:{b}" for s in ("smollm2-135m", "llama-3.2-1b", "llama-3-8b") for d in ("arce", "gsm8k") for b in (8, 32)
]
TINY_ROWS = ["tiny:arce:8", "tiny:gsm8k:8"]
# Ratios of step time printed under the table, with the targets.
RATIOS = [
    ("ours_nls", "ours_lora", 1.03),
    ("ours_sparsepeft", "ours_lora", 1.4),
    ("ours_sparsepeft_nodrop", "ours_lora_nodrop", 1.4),
]
SHOWN = ("row", "setup", "status", "real_tokens_per_s", "peak_gpu_gib", "mfu", "loss_first", "loss_last", "error")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=(package_doc or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few steps: runs on a CPU (a script check)")
    parser.add_argument(
        "--rows",
        help="comma-separated shape:data:batch[:setup+setup...] (default: the full table, or the tiny rows; "
        "a row's own setups replace --setups for it)",
    )
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS + EXTRA_SETUPS)
    )
    parser.add_argument("--steps", type=int, help="measured steps per setup (default 10; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps first (default 3; 1 with --tiny)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--no-profile", action="store_true", help="no profiled steps after each timed window (bench/gpu/profile.py)"
    )
    parser.add_argument("--data-dir", help="holds arce_train_instruct.json and gsm8k_train.jsonl")
    parser.add_argument("--tokenizer", help="a saved tokenizer directory (default: .gpu-carry/tokenizer or SmolLM2's)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    parser.add_argument("--child-timeout-s", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_rows(rows: str, setups: list[str]) -> list[tuple[str, str, int, list[str]]]:
    """``shape:data:batch[:setup+setup]`` rows as ``(shape, data, batch, setups)``, a row's own setups
    replacing ``setups``. Every row is checked before any runs: a typo in the last row must not cost a
    GPU session its earlier rows.
    """
    plans = []
    for plan in rows.split(","):
        shape, data, batch, *own = plan.split(":")
        row_setups = own[0].split("+") if own else setups
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r} in row {plan!r} (known: {', '.join(SHAPES)})")
        for setup in row_setups:
            if setup not in SETUPS + EXTRA_SETUPS:
                raise SystemExit(f"unknown setup {setup!r} in row {plan!r} (known: {', '.join(SETUPS + EXTRA_SETUPS)})")
        plans.append((shape, data, int(batch), row_setups))
    return plans


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One setup in a fresh interpreter; its last stdout line is its JSON row."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    cmd = [sys.executable, "-m", "bench.gpu", "--child", handle.name]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"setup": spec["setup"], "status": "timeout", "error": f"over {timeout:.0f} s"}
    finally:
        Path(handle.name).unlink(missing_ok=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in tail)
        return {"setup": spec["setup"], "status": "OOM" if oom else "failed", "error": " | ".join(tail)[-1500:]}
    row = json.loads(lines[-1])
    row.setdefault("status", "ok")
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def child_main(spec_path: str) -> None:
    from .setups import run_setup

    spec = json.loads(Path(spec_path).read_text())
    Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_setup(spec)), flush=True)


def complete(row: dict[str, Any], shape: str, peak_tflops: float | None) -> dict[str, Any]:
    """MFU by the 6·N convention (the issue's), and by 4·N (what a frozen-base step computes)."""
    n = linear_params(shape)
    rate = row.get("real_tokens_per_s")
    if rate and peak_tflops:
        row["mfu"] = round(rate * 6 * n / (peak_tflops * 1e12), 4)
        row["mfu_4n"] = round(rate * 4 * n / (peak_tflops * 1e12), 4)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"GPU training throughput, {meta['device_name']} (bf16 GEMM peak {meta['bf16_tflops']} TFLOP/s), "
        f"torch {meta['torch']}, {meta['steps']} measured steps after {meta['warmup']} warm-up",
        "",
        "| row | setup | status | real tok/s | x HF | peak GPU GiB | MFU (6N) | first step s | loss first -> last |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    hf = {r["row"]: r for r in rows if r["setup"] == "hf" and r.get("status") == "ok"}
    for r in rows:
        base = hf.get(r["row"])
        speedup = (
            f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}" if base and r.get("real_tokens_per_s") else "-"
        )
        loss = f"{r['loss_first']} -> {r['loss_last']}" if "loss_first" in r else "-"
        lines.append(
            f"| {r['row']} | {r['setup']} | {r.get('status')} | {r.get('real_tokens_per_s', '-')} | {speedup} | "
            f"{r.get('peak_gpu_gib', '-')} | {r.get('mfu', '-')} | {r.get('first_step_s', '-')} | {loss} |"
        )
    profiles = [line for line in map(describe, rows) if line]
    if profiles:
        lines += ["", "What limits each row (a profile of the steps after the timed window):", *profiles]
    by = {(r["row"], r["setup"]): r for r in rows if r.get("status") == "ok"}
    for setup, ref, target in RATIOS:
        for row in dict.fromkeys(r["row"] for r in rows):
            a, b = by.get((row, setup)), by.get((row, ref))
            if a and b:
                lines.append(
                    f"- {row}: {setup} step / {ref} step = {a['step_s'] / b['step_s']:.3f} (target <= {target})"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    import torch  # the parent only asks which device there is; the children hold it

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA GPU here: the benchmark is for one GPU (--tiny checks the script on a CPU)")
    steps = args.steps or (2 if args.tiny else 10)
    warmup = args.warmup or (1 if args.tiny else 3)
    plans = parse_rows(args.rows or ",".join(TINY_ROWS if args.tiny else FULL_ROWS), args.setups.split(","))
    work = Path(tempfile.mkdtemp(prefix="sqft-bench-gpu-"))
    root = data_dir(args.data_dir)
    tokenizer = tokenizer_dir(args.tokenizer, work)
    started = time.perf_counter()
    base = {
        "device": device,
        "seed": args.seed,
        "tokenizer": tokenizer,
        "steps": steps,
        "warmup": warmup,
        "profile": not args.no_profile,
    }
    peak = run_child({**base, "setup": "gemm_peak", "tmp": str(work / "peak")}, args.child_timeout_s)
    print(f"bf16 GEMM peak: {peak.get('bf16_tflops')} TFLOP/s on {peak.get('device_name')}", flush=True)
    rows: list[dict[str, Any]] = []
    for shape, data, batch_size, row_setups in plans:
        plan = f"{shape}:{data}:{batch_size}"
        path = data_file(data, root, work)
        for setup in row_setups:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                rows.append({"row": plan, "setup": setup, "status": "skipped (time budget)"})
                continue
            spec = {
                **base,
                "setup": setup,
                "shape": shape,
                "data": path,
                "batch_size": batch_size,
                "samples": (warmup + steps + PROFILED_STEPS) * batch_size * 2,
                "tmp": str(work / f"{shape}-{data}-{batch_size}-{setup}"),
            }
            row = {"row": plan, "data": describe_data(path), **run_child(spec, args.child_timeout_s)}
            complete(row, shape, peak.get("bf16_tflops"))
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in SHOWN}), flush=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_name": peak.get("device_name"),
        "bf16_tflops": peak.get("bf16_tflops"),
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "tiny": args.tiny,
        "lora": "r=16, alpha 32, dropout 0.05, q/k/v/up/down",
        "timing": "real (non-pad) tokens over the measured steps / their time; the device synchronised at the "
        "window's two ends only",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = markdown(rows, meta)
    slug = re.sub(r"[^a-z0-9]+", "-", str(meta["device_name"]).lower()).strip("-")
    name = f"{dt.date.today().isoformat()}-gpu-{slug}{'-tiny' if args.tiny else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / (name + '.json')}")


if __name__ == "__main__":
    main()
