"""Entry point: ``python -m bench.throughput [options]`` from the repository root (``make bench``).

The parent measures the GEMM peak, runs the planned setups group by group (each setup a child
process, ``--child``), the SparsePEFT layer micro-benchmark, and writes and prints the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqft_service.threads import physical_cores

from . import __doc__ as package_doc
from .inputs import (
    GGUF_NAME,
    RESULTS,
    TARGETS,
    default_model,
    find_data,
    generated_data,
    gsm8k_as_alpaca,
    prepare_models,
)
from .report import REQUIRED, complete_row, cpu_name, markdown, model_flops_per_token, write_results
from .runner import child_main, run_child, run_group
from .setups import SETUPS, group_of, run_setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=(package_doc or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="few steps, fewer examples (< 5 min)")
    parser.add_argument("--model", help="a .gguf file, a model directory or a hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", help="Alpaca JSON/JSONL training file (default: shared ARC-E, else generated)")
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help="comma-separated subset of: " + ",".join(SETUPS) + " (and, opt-in, ours_lora_compile, ours_lora_sdpa)",
    )
    parser.add_argument("--steps", type=int, help="measured steps per setup (default: 3 quick, 20 full)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per setup, not measured (default: 1 quick, 3 full)")
    parser.add_argument("--samples", type=int, help="training examples to tokenize (default: 256 quick, 2048 full)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 rows even without native bf16")
    parser.add_argument("--no-gsm8k", action="store_true", help="skip the long-sequence GSM8K rows (full mode)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan_setups(args: argparse.Namespace, spec, best_precision: str, tmp_root: Path) -> list[dict[str, Any]]:
    """The specs to run, in table order: the requested setups, then (full mode) the extra rows."""
    plan: list[dict[str, Any]] = []
    steps = args.steps or (3 if args.quick else 20)
    for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
        over: dict[str, Any] = {}
        if name == "reference_pad512":  # ~8x the tokens per step: fewer steps keep it affordable
            over = {"steps": 1, "warmup": 0} if args.quick else {"steps": max(2, steps // 4), "warmup": 1}
        if name.startswith("ours_"):
            over["mixed_precision"] = best_precision
        plan.append(spec(name, **over))
    if "ours_sparsepeft" in args.setups and not args.quick:
        plan.append(spec("ours_lora_nodropout", mixed_precision=best_precision))
        plan.append(spec("ours_sparsepeft_nodropout", mixed_precision=best_precision))
    if not args.quick:
        plan.append(spec("ours_lora_fp32", mixed_precision="no"))
        plan.append(spec("ours_lora_gradckpt", mixed_precision=best_precision))
        plan.append(spec("ours_lora_unsorted", mixed_precision=best_precision))
        plan.append(spec("ours_lora_packed", mixed_precision=best_precision))
        gsm = None if args.no_gsm8k else find_data("gsm8k_train.jsonl")
        if gsm is not None:
            gsm_data = str(gsm8k_as_alpaca(gsm, tmp_root / "gsm8k.json"))
            plan.append(spec("hf_peft_fp32_gsm8k", data=gsm_data, samples=512))
            plan.append(spec("ours_lora_gsm8k", data=gsm_data, samples=512, mixed_precision=best_precision))
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, run_setup)
        return 0

    t_start = time.perf_counter()
    threads = args.threads or physical_cores()
    steps = args.steps or (3 if args.quick else 20)  # quick: under 5 min even when the VM runs slow
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    samples = args.samples or (256 if args.quick else 2048)
    model_dir, sparse_dir = prepare_models(args.model)
    data = Path(args.data) if args.data else find_data("arce_train_instruct.json")
    tmp_root = Path(tempfile.mkdtemp(prefix="sqft-bench-"))
    if data is None:
        data = generated_data(tmp_root / "generated.json", samples)
    base_spec = {
        "model_dir": model_dir,
        "sparse_model_dir": sparse_dir,
        "data": str(data),
        "samples": samples,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "lr": args.lr,
        "seed": args.seed,
        "threads": threads,
        "warmup": warmup,
        "steps": steps,
        "quick": args.quick,
        "reps": 8 if args.quick else 40,
    }

    def spec(name: str, **over: Any) -> dict[str, Any]:
        return {**base_spec, "name": name, "tmp": str(tmp_root / name), **over}

    peaks = run_child(spec("peaks"), timeout=120)
    has_bf16 = bool(peaks.get("native_bf16"))
    print(f"GEMM peak: fp32 {peaks.get('fp32')} GFLOP/s, bf16 {peaks.get('bf16')} GFLOP/s (native bf16: {has_bf16})")
    flops_per_token, n_params = model_flops_per_token(model_dir)
    plan = plan_setups(args, spec, "bf16" if has_bf16 else "no", tmp_root)

    rows_by_name: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in plan:
        if "bf16" in s["name"] and s["name"].startswith("hf_") and not has_bf16 and not args.force_bf16:
            row = {k: None for k in REQUIRED}
            row.update(
                name=s["name"],
                precision="bf16",
                skipped=f"no native bf16 on this CPU (bf16 GEMM {peaks.get('bf16')} GFLOP/s vs fp32 "
                f"{peaks.get('fp32')}); --force-bf16 runs it",
            )
            rows_by_name[s["name"]] = row
            print(f"{s['name']}: skipped ({row['skipped']})", flush=True)
            continue
        groups.setdefault(group_of(s["name"]), []).append(s)
    for members in groups.values():
        names = ", ".join(m["name"] for m in members)
        print(
            f"{names}: running, turn by turn ({members[0]['warmup']} warm-up + {members[0]['steps']} measured "
            "steps each) ...",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        for row in run_group(members, timeout=3600):
            row["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            complete_row(row, peaks, flops_per_token)
            print(
                f"  {row['name']} -> {row.get('real_tokens_per_s')} real tok/s, step {row.get('step_s')} s, "
                f"RSS {row.get('peak_rss_mb')} MB, loss {row.get('loss_first')} -> {row.get('loss_last')}"
                + (f"  ERROR {row['error']}" if row.get("error") else ""),
                flush=True,
            )
            rows_by_name[row["name"]] = row
    rows = [rows_by_name[s["name"]] for s in plan if s["name"] in rows_by_name]
    layer = run_child(spec("sparse_layer"), timeout=300)
    if "error" in layer:
        print(f"sparse_layer: ERROR {layer['error']}", flush=True)

    now = dt.datetime.now()
    host = socket.gethostname()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "host": host,
        "cpu": cpu_name(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "torch": __import__("torch").__version__,
        "model": str(args.model or default_model()),
        "model_name": Path(args.model or GGUF_NAME).stem,
        "model_params_matmul": n_params,
        "flops_per_token": flops_per_token,
        "data": str(data),
        "samples": samples,
        "rank": args.rank,
        "targets": TARGETS,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "peaks": {"fp32": peaks.get("fp32"), "bf16": peaks.get("bf16"), "native_bf16": has_bf16},
        "sparse_layer": layer if "error" not in layer else None,
        "wall_s": None,
    }
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    path, latest = write_results(args.out, now.strftime("%Y-%m-%d"), host, {**meta, "rows": rows})
    shutil.rmtree(tmp_root, ignore_errors=True)
    print()
    print(markdown(rows, meta))
    print(f"\nwrote {path} and {latest} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
