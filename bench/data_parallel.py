"""2 data-parallel ranks vs 1 process on this machine: speed, and the loss curves side by side.

    .venv/bin/python -m bench.data_parallel [--steps 10] [--global-batch 8] [--model PATH]

Every setup trains the same global batch with the same seed in fp32: 1 process with every physical
core as threads, the same on one thread (what intra-op threads add), and 2 gloo ranks
(training/distributed.py) with half the cores each. Step times come
from the recipe's step hooks (step 1 left out: it holds the longest batch and warms the allocator).
Writes ``bench/results/<date>-data-parallel-<host>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
from bench.throughput.inputs import CACHE, RESULTS, TARGETS, default_model, find_data, generated_data
from bench.throughput.report import cpu_name

from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.threads import physical_cores
from sqft_service.training.events import MemorySink
from sqft_service.training.hooks import StepStats
from sqft_service.training.recipe import FinetuneRecipe


class StepTimes:
    def __init__(self) -> None:
        self.rows: list[StepStats] = []

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, stats: StepStats) -> None:
        self.rows.append(stats)


def make_cfg(model_dir: str, data: Path, batch_size: int, workers: int, steps: int, threads: int) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = model_dir
    cfg.General.lora_config = LoraSection(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    cfg.Dataset.train_file = str(data)
    cfg.Dataset.validation_split_percentage = 0
    cfg.Dataset.max_length = 256
    cfg.Dataset.max_source_length = 192
    t = cfg.Training
    t.batch_size, t.num_training_workers, t.max_train_steps, t.num_threads = batch_size, workers, steps, threads
    t.learning_rate, t.lr_scheduler, t.seed, t.logging_steps = 1e-4, "constant", 0, 1
    t.device, t.mixed_precision = "cpu", "no"
    return cfg


def train(cfg_json: str, out_dir: str) -> dict:
    cfg = FinetuneConfig.model_validate_json(cfg_json)
    times = StepTimes()
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, Path(out_dir), sink, step_hooks=[times])
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    later = times.rows[1:]
    return {
        "losses": [r.loss for r in times.rows],
        "median_step_s": statistics.median(r.seconds for r in later),
        "tokens_per_s": sum(r.real_tokens for r in later) / sum(r.seconds for r in later),
        "threads_per_process": torch.get_num_threads(),
    }


def _rank(rank: int, world: int, store: str, cfg_json: str, out_dir: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        figures = train(cfg_json, f"{out_dir}/rank{rank}")
        if rank == 0:
            Path(result).write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")

    from sqft_service.training.models import resolve_model_dir

    model_dir = resolve_model_dir(str(args.model or default_model()), CACHE / "models")
    data = find_data("arce_train_instruct.json") or generated_data(CACHE / "generated.json", 2000)
    cores = physical_cores()
    load_before = os.getloadavg()[0]  # other work on the machine skews both setups; recorded, not hidden
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        one = make_cfg(model_dir, data, args.global_batch, 1, args.steps, cores)
        rows["1 process"] = train(one.model_dump_json(), f"{tmp}/one")
        # What intra-op threads add at all: the same process on one thread.
        single = make_cfg(model_dir, data, args.global_batch, 1, args.steps, 1)
        rows["1 process, 1 thread"] = train(single.model_dump_json(), f"{tmp}/single")
        torch.set_num_threads(cores)
        two = make_cfg(model_dir, data, args.global_batch // 2, 2, args.steps, max(1, cores // 2))
        result = f"{tmp}/two.json"
        spawn_args = (2, f"{tmp}/store", two.model_dump_json(), f"{tmp}/two", result)
        torch.multiprocessing.spawn(_rank, args=spawn_args, nprocs=2, join=True)
        rows["2 ranks"] = json.loads(Path(result).read_text())
    base = rows["1 process"]
    drift = max(abs(a - b) / abs(b) for a, b in zip(rows["2 ranks"]["losses"], base["losses"], strict=True))
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{socket.gethostname()} ({cpu_name()}, {cores} physical cores)",
        "torch": torch.__version__,
        "model": Path(model_dir).name,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "precision": "fp32",
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "setups": rows,
        "speedup_2_ranks": base["median_step_s"] / rows["2 ranks"]["median_step_s"],
        "max_relative_loss_difference": drift,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d-%H%M}-data-parallel-vm.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"| setup | threads/process | median step s | tokens/s |  ({report['machine']}, {report['model']})")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['threads_per_process']} | {row['median_step_s']:.2f} | {row['tokens_per_s']:.0f} |")
    print(f"speed-up of 2 ranks: {report['speedup_2_ranks']:.2f}x; largest relative loss difference {drift:.1e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
