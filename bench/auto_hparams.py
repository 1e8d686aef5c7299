"""Measure hyperparameter choices for "auto": ``python -m bench.auto_hparams`` from the repository root.

Trains SmolLM2-135M-Instruct with the service's own recipe (:class:`FinetuneRecipe`) on fixed subsets
of ARC-E and GSM8K under several configurations (the reference's defaults, a fixed "batch 8 / lr 2e-4 /
r 16" setting, candidate auto rules, and what ``sqft_service.auto_hparams`` picks today), each run with
the same seed, data and held-out validation split. It records the final validation loss (response
tokens), steps, tokens trained, wall time and CPU seconds, writes the JSON after every run (a partial
table survives an interruption) and prints a markdown table.

Wall times on a shared 2-core machine are noisy: compare configurations by tokens, steps and CPU
seconds. Runs may be spread over several processes (``--runs`` one pair each, ``--threads 1``) and
their files joined with ``--merge``; the 2026-11-28 table was made that way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqft_service.auto_hparams import apply
from sqft_service.config import FinetuneConfig

from .throughput.inputs import CACHE, RESULTS, default_model, find_data

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Each configuration is the sections' fields it sets; everything else keeps the reference default.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    # The reference README's curl sends no hyperparameters: these are its section defaults (target
    # modules None: this service's default, every attention and MLP projection).
    "reference_defaults": {"Training": {}, "lora": {}},
    "fixed_b8_lr2e-4_r16": {
        "Training": {"batch_size": 8, "learning_rate": 2e-4},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]},
    },
    **{
        f"cand_b{bs}_lr{lr}_all": {
            "Training": {"batch_size": bs, "learning_rate": float(lr), "lr_scheduler": "cosine", "warmup_frac": 0.06},
            "lora": {"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR},
        }
        for bs, lr in ((8, "5e-4"), (4, "5e-4"), (2, "1e-3"), (8, "1e-3"))
    },
}


def prepare_data(work: Path, n_train: dict[str, int], n_val: dict[str, int]) -> dict[str, tuple[Path, Path]]:
    """Shuffle each data set once (seed 0), hold out the first ``n_val`` records, train on the next ``n_train``."""
    sources = {"arc_e": "arce_train_instruct.json", "gsm8k": "gsm8k_train.jsonl"}
    out: dict[str, tuple[Path, Path]] = {}
    for name, file in sources.items():
        path = find_data(file)
        if path is None:
            raise SystemExit(f"{file} not found under ../shared/data")
        if path.suffix == ".jsonl":  # GSM8K's {"question", "answer"} as Alpaca records
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            records = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in records]
        else:
            records = json.loads(path.read_text())
        random.Random(0).shuffle(records)
        val, train = records[: n_val[name]], records[n_val[name] : n_val[name] + n_train[name]]
        out[name] = (work / f"{name}_train.json", work / f"{name}_val.json")
        out[name][0].write_text(json.dumps(train))
        out[name][1].write_text(json.dumps(val))
    return out


def build_config(
    name: str, model: str, train: Path, val: Path, n_train: int, seed: int, threads: int | None, micro_batch: int | None
) -> FinetuneConfig:
    if name == "auto" or name.startswith("auto_e"):
        # What the service itself picks for a job that leaves everything unset ("auto_e<k>": the same
        # with k epochs, as a client sending n_epochs gets it).
        cfg = FinetuneConfig()
        explicit: set[str] = set()
        if name != "auto":
            cfg.Training.epochs, explicit = int(name.removeprefix("auto_e")), {"Training.epochs"}
        cfg = apply(cfg, n_train, explicit=explicit)
    else:
        spec = CONFIGS[name]
        training = dict(spec["Training"])
        warmup_frac = training.pop("warmup_frac", 0.0)
        cfg = FinetuneConfig.model_validate(
            {"General": {"lora_config": spec["lora"]}, "Training": training},
        )
        steps = -(-n_train // cfg.Training.batch_size)
        cfg.Training.warmup_steps = round(warmup_frac * steps)
    cfg.General.base_model = model
    cfg.Dataset.train_file = str(train)
    cfg.Dataset.validation_file = str(val)
    cfg.Training.seed = seed
    cfg.Training.num_threads = threads
    if micro_batch and cfg.Training.batch_size > micro_batch:
        # The same optimizer step in less memory: the recipe normalises an accumulated step's loss
        # over all its label tokens (training/recipe.py), as one big batch would.
        cfg.Training.gradient_accumulation_steps = cfg.Training.batch_size // micro_batch
        cfg.Training.batch_size = micro_batch
    cfg.Training.mixed_precision = "no"
    return FinetuneConfig.model_validate(cfg.model_dump())


def run_one(cfg: FinetuneConfig, out_dir: Path, *, base_eval: bool) -> dict[str, Any]:
    from sqft_service.training.events import MemorySink
    from sqft_service.training.recipe import FinetuneRecipe

    sink = MemorySink(echo=True)  # progress lines in the log
    recipe = FinetuneRecipe(cfg, out_dir, sink, model_cache_dir=CACHE / "models")
    t0 = time.perf_counter()
    recipe.setup()
    row: dict[str, Any] = {"setup_s": round(time.perf_counter() - t0, 1)}
    if base_eval:
        t1 = time.perf_counter()
        row["base_valid_loss"] = recipe.evaluate()["valid_loss"]
        row["base_eval_s"] = round(time.perf_counter() - t1, 1)
    t2, cpu2 = time.perf_counter(), time.process_time()
    result = recipe.train()
    row["train_and_eval_s"] = round(time.perf_counter() - t2, 1)
    # CPU seconds of every thread: the budget measure that survives a shared, overloaded machine.
    row["train_and_eval_cpu_s"] = round(time.process_time() - cpu2, 1)
    recipe.cleanup()
    evals = [m for m in sink.metric_rows if "valid_loss" in m]
    t = cfg.Training
    lora = cfg.General.lora_config
    row.update(
        {
            "valid_loss": evals[-1]["valid_loss"],
            "valid_loss_by_epoch": [m["valid_loss"] for m in evals],
            "valid_token_accuracy": evals[-1]["valid_mean_token_accuracy"],
            "steps": result.steps,
            "trained_tokens": result.trained_tokens,
            "train_examples": len(recipe.train_examples),
            "valid_examples": len(recipe.eval_examples),
            "tokens_per_s": round(result.trained_tokens / row["train_and_eval_s"], 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "hyperparameters": {
                "epochs": t.epochs,
                "batch_size": t.batch_size * t.gradient_accumulation_steps,
                "micro_batch": t.batch_size,
                "learning_rate": t.learning_rate,
                "lr_scheduler": t.lr_scheduler,
                "warmup_steps": t.warmup_steps,
                "r": lora.r,
                "lora_alpha": lora.lora_alpha,
                "lora_dropout": lora.lora_dropout,
                "target_modules": lora.target_modules,
            },
        }
    )
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | train / valid | configuration | epochs | batch | lr | r / alpha | targets | steps | tokens "
        "| wall s | CPU s | valid loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = r["hyperparameters"]
        targets = "all projections" if h["target_modules"] is None else ",".join(m[0] for m in h["target_modules"])
        lines.append(
            f"| {r['data']} | {r['train_examples']} / {r['valid_examples']} | {r['config']} | {h['epochs']} | "
            f"{h['batch_size']} | {h['learning_rate']:g} | "
            f"{h['r']} / {h['lora_alpha']:g} | {targets} | {r['steps']} | {r['trained_tokens']:,} | "
            f"{r['train_and_eval_s']} | {r.get('train_and_eval_cpu_s', '')} | {r['valid_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auto_hparams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arc-train", type=int, default=600)
    parser.add_argument("--arc-val", type=int, default=200)
    parser.add_argument("--gsm-train", type=int, default=240)
    parser.add_argument("--gsm-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the job's policy)")
    parser.add_argument(
        "--runs",
        default="arc_e:reference_defaults,arc_e:fixed_b8_lr2e-4_r16,arc_e:auto,"
        "gsm8k:reference_defaults,gsm8k:fixed_b8_lr2e-4_r16,gsm8k:auto",
        help="comma-separated data:configuration pairs, run in order (configurations: auto, auto_e<k> (k epochs), "
        + ", ".join(CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / f"{dt.date.today()}-auto-hparams-{socket.gethostname()}.json"
    )
    parser.add_argument("--micro-batch", type=int, help="split larger batches into accumulated micro-batches")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these result files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        merged = [json.loads(p.read_text()) for p in args.merge]
        report = {**merged[0], "rows": [r for m in merged for r in m["rows"]]}
        report["command"] = [m["command"] for m in merged]
        report["data"] = {k: v for m in merged for k, v in m["data"].items()}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(markdown(report["rows"]))
        return

    model = str(default_model())
    n_train = {"arc_e": args.arc_train, "gsm8k": args.gsm_train}
    n_val = {"arc_e": args.arc_val, "gsm8k": args.gsm_val}
    work = Path(tempfile.mkdtemp(prefix="sqft-auto-hparams-"))
    data = prepare_data(work, n_train, n_val)
    report: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "model": Path(model).name,
        "data": {
            k: {"train": n_train[k], "validation": n_val[k], "shuffle_seed": 0}
            for k in n_train
            if any(pair.startswith(f"{k}:") for pair in args.runs.split(","))
        },
        "seed": args.seed,
        "threads": args.threads,
        "command": " ".join(["python -m bench.auto_hparams", *(argv if argv is not None else sys.argv[1:])]),
        "mixed_precision": "no",
        "rows": [],
    }
    evaluated_base: set[str] = set()
    for pair in args.runs.split(","):
        ds, name = pair.split(":")
        cfg = build_config(name, model, *data[ds], n_train[ds], args.seed, args.threads, args.micro_batch)
        print(f"== {ds} / {name}", flush=True)
        row = run_one(cfg, work / f"{ds}-{name}", base_eval=ds not in evaluated_base)
        evaluated_base.add(ds)
        row = {"data": ds, "config": name, **row}
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report["rows"]))


if __name__ == "__main__":
    main()
