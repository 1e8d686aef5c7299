"""What one child process runs: a setup on a row, timed over a window with the device synchronised at its ends.

Only the window's two ends wait for the device: a timer per step would force the host to wait for
every step, which is what the GPU path of the recipe avoids (and HF's Trainer does not need either).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .inputs import NLS_GROUPS, TARGETS, build_model
from .profile import PROFILED_STEPS, Capture


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _memory(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def gemm_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """bf16 matmul TFLOP/s of this device: 8192³ on a GPU (1024³ on a CPU, for --tiny only)."""
    import torch

    device = spec["device"]
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - t0) / reps
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"name": "gemm_peak", "device_name": name, "n": n, "bf16_tflops": round(2 * n**3 / seconds / 1e12, 1)}


def hf_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain ``transformers.Trainer`` + stock peft, ``bf16=True`` (fp32 weights + bf16 autocast)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from sqft_service.config import DatasetSection
    from sqft_service.training.precision import native_bf16_supported
    from sqft_service.training.records import load_records
    from sqft_service.training.tokenization import tokenize_records

    device, warmup, total = spec["device"], spec["warmup"], spec["warmup"] + spec["steps"]
    capture = Capture(device, total + 1)  # the steps after the timed window, if profiled
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    records = load_records(spec["data"])[: spec["samples"]]
    examples = tokenize_records(records, tokenizer, DatasetSection()).examples
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    model = build_model(spec["shape"], device)
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens: list[int] = []  # real tokens of each collated batch, counted on the host

    def collate(batch):
        batch_tokens.append(sum(len(f["input_ids"]) for f in batch))
        return pad(batch)

    clock: dict[str, float] = {}
    losses: list[torch.Tensor] = []

    class Kept(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)  # a device tensor: read after training, no sync here
            return loss

    class Window(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _reset_peak(device)  # the peak of training: weights, optimizer, activations

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                _sync(device)
                clock["t0"] = time.perf_counter()
            capture.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == total:
                _sync(device)
                clock["t1"] = time.perf_counter()
            capture.end(state.global_step)

    bf16 = device == "cuda" or native_bf16_supported()
    args = TrainingArguments(
        output_dir=spec["tmp"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=total + (PROFILED_STEPS if spec.get("profile") else 0),
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=total,  # HF reads its loss at logging steps: once, as ours does here
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        bf16=bf16,
        use_cpu=device != "cuda",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    trainer = Kept(model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[Window()])
    trainer.train()
    tokens = sum(batch_tokens[warmup:total])
    return {
        "setup": "hf",
        "trainer": "transformers.Trainer + peft",
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
        "real_tokens_per_s": round(tokens / (clock["t1"] - clock["t0"]), 1),
        "step_s": round((clock["t1"] - clock["t0"]) / spec["steps"], 4),
        "peak_gpu_gib": _memory(device),
        "loss_first": round(float(losses[0]), 4),
        "loss_last": round(float(losses[total - 1]), 4),
        "profile": capture.summary,
    }


def ours_row(spec: dict[str, Any]) -> dict[str, Any]:
    """:class:`FinetuneRecipe` as a job runs it; only the model comes from :func:`build_model`."""
    import torch

    import sqft_service.training.recipe as recipe_module
    from sqft_service.config import FinetuneConfig, LoraSection
    from sqft_service.training.events import MemorySink
    from sqft_service.training.hooks import StepHook, StepStats

    device, warmup, total = spec["device"], spec["warmup"], spec["warmup"] + spec["steps"]
    setup = spec["setup"]
    method = setup.removesuffix("_compile").removesuffix("_nodrop")  # ours_lora, ours_nls, ours_sparsepeft
    dropout = 0.0 if setup.endswith("_nodrop") else 0.05
    # The job loads a model directory; here the same random weights as the HF row, built on the device.
    recipe_module.resolve_model_dir = lambda ref, cache=None: spec["tokenizer"]
    recipe_module.load_base_model = lambda *a, **k: build_model(
        spec["shape"], device, sparse=method == "ours_sparsepeft"
    )
    lora = LoraSection(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)
    if method == "ours_nls":
        lora = LoraSection(
            r=16,
            lora_alpha=32,
            lora_dropout=dropout,
            neural_lora_search=True,
            target_module_groups=NLS_GROUPS,
            search_space=["16,12,8"] * len(NLS_GROUPS),
        )
    lora.sparse_adapter = method == "ours_sparsepeft"
    cfg = FinetuneConfig()
    cfg.General.base_model = f"random-init {spec['shape']}"
    cfg.General.lora_config = lora
    cfg.Dataset.train_file = spec["data"]
    cfg.Dataset.max_train_samples = spec["samples"]
    cfg.Dataset.validation_split_percentage = 0
    t = cfg.Training
    t.batch_size, t.learning_rate, t.lr_scheduler, t.seed = spec["batch_size"], 2e-4, "constant", spec["seed"]
    # Losses read at step 1 and at the window's end; then, if profiled, PROFILED_STEPS more steps.
    t.max_train_steps, t.logging_steps = total + (PROFILED_STEPS if spec.get("profile") else 0), total
    t.device = "cuda" if device == "cuda" else "cpu"
    t.torch_compile = setup.endswith("_compile")
    if spec.get("attn"):  # bench/gpu/launches.py: the GPU's attention on a CPU
        t.attn_implementation = spec["attn"]

    capture = Capture(device, total + 1)

    class Window(StepHook):
        def __init__(self) -> None:
            self.tokens, self.t0, self.t1, self.first = 0, 0.0, 0.0, 0.0

        def before_step(self, step: int) -> None:
            if step == 1:  # the first step holds torch.compile's compilation
                _sync(device)
                self.first = time.perf_counter()
            if step == warmup + 1:
                _sync(device)
                self.t0 = time.perf_counter()
            capture.begin(step)

        def after_step(self, step: int, stats: StepStats) -> None:
            if step == 1:
                _sync(device)
                self.first = time.perf_counter() - self.first
            if step > warmup:
                self.tokens += stats.real_tokens
            if step == total:
                _sync(device)
                self.t1 = time.perf_counter()
            capture.end(step)

    window = Window()
    sink = MemorySink()
    recipe = recipe_module.FinetuneRecipe(cfg, Path(spec["tmp"]), sink, step_hooks=[window])
    recipe.setup()
    # Built on the device in fp32 and cast there, unlike a job (cast on the host, then moved): the
    # build's fp32 peak is not the training's.
    _reset_peak(device)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    losses = [row["train_loss"] for row in sink.metric_rows if "train_loss" in row and row["step"] <= total]
    placed = next(d for _, _, d in sink.messages if d and "precision" in d)
    return {
        "setup": setup,
        "trainer": "sqft FinetuneRecipe",
        "precision": placed["precision"] + (", bf16 frozen base" if recipe.autocast_dtype is torch.bfloat16 else ""),
        "real_tokens_per_s": round(window.tokens / (window.t1 - window.t0), 1),
        "step_s": round((window.t1 - window.t0) / spec["steps"], 4),
        "first_step_s": round(window.first, 3),
        "peak_gpu_gib": _memory(device),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "warnings": [text for level, text, _ in sink.messages if level == "warn"],
        "profile": capture.summary,
    }


def run_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work; an out-of-memory error is a row of its own, not a crash."""
    import torch

    if spec["setup"] == "gemm_peak":
        return gemm_peak(spec)
    try:
        return hf_row(spec) if spec["setup"] == "hf" else ours_row(spec)
    except torch.OutOfMemoryError as exc:
        return {"setup": spec["setup"], "status": "OOM", "error": str(exc).splitlines()[0][:300]}
