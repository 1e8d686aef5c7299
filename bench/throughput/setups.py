"""What each compared setup runs in its child process, and which setups share a turn-taking group.

Every setup returns one row (:func:`.report.summarize`) from per-step records ``{seconds, tokens,
padded, loss}``, timed around the optimizer step only: the turn gate (:class:`.runner.Turns`) is
passed before the clock starts and handed on after it stops.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqft_service.training.hooks import StepHook, StepStats

from .inputs import NLS_GROUPS, TARGETS
from .kernels import peaks_row, sparse_layer_row
from .report import summarize
from .runner import Turns

SETUPS = [
    "hf_peft_fp32",
    "hf_peft_fp32_same_order",
    "hf_peft_bf16",
    "reference_pad512",
    "ours_lora",
    "ours_nls",
    "ours_sparsepeft",
]


def group_of(name: str) -> str:
    """Setups compared with each other run in one group, turn by turn.

    A group's processes are all resident at once (~3-4 GB each); the 512-padded reference (~14 GB)
    runs alone.
    """
    targets = ("hf_peft_fp32", "hf_peft_bf16", "ours_lora", "ours_nls", "ours_sparsepeft")
    if name in (*targets, "ours_lora_compile", "ours_lora_sdpa"):
        return "targets"
    if name in ("hf_peft_fp32_same_order", "ours_lora_nodropout", "ours_sparsepeft_nodropout"):
        return "same_order_and_no_dropout"
    if name.endswith("_gsm8k"):
        return "gsm8k"
    if name.startswith("ours_lora_"):
        return "lora_variants"
    return name


def run_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work for ``spec["name"]``."""
    name = spec["name"]
    if name == "sparse_layer":
        return sparse_layer_row(spec)
    if name == "peaks":
        return peaks_row(spec)
    if name.startswith(("hf_", "reference_")):
        return hf_row(spec)
    return ours_row(spec)


# ------------------------------------------------------------------------------ HF Trainer + PEFT
def hf_row(spec: dict[str, Any]) -> dict[str, Any]:
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
    from sqft_service.training.batching import length_grouped_batches
    from sqft_service.training.records import load_records
    from sqft_service.training.tokenization import tokenize_records

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # as our collator: same position ids for the same example
    records = load_records(spec["data"])[: spec["samples"]]
    examples = tokenize_records(records, tokenizer, DatasetSection()).examples
    same_order = spec["name"].endswith("_same_order")
    if same_order:
        # Feed HF exactly the batches our recipe trains on (its length-grouped order for epoch 0), read
        # sequentially: same examples per step, so the loss curves can be compared step by step.
        batches = length_grouped_batches(
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


# ------------------------------------------------------------------------------------------- ours
class TurnClock(StepHook):
    """Takes this process's turn before each optimizer step and records the loop's own measurement.

    ``stats.seconds`` is the recipe's step time: the NLS draw (for NLS jobs) plus the step itself,
    without the wait for the turn.
    """

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.steps: list[dict[str, float]] = []

    def before_step(self, step: int) -> None:
        self.turns.acquire()

    def after_step(self, step: int, stats: StepStats) -> None:
        self.turns.release()
        self.steps.append(
            {"seconds": stats.seconds, "tokens": stats.real_tokens, "padded": stats.padded_tokens, "loss": stats.loss}
        )


def ours_row(spec: dict[str, Any]) -> dict[str, Any]:
    """This project's FinetuneRecipe, exactly as a job runs it, timed through its public step hooks."""
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
    t.torch_compile = name.endswith("_compile")  # opt-in row: its first (warm-up) step compiles
    if name.endswith("_sdpa"):  # opt-in row: SDPA where "auto" would take eager attention
        t.attn_implementation = "sdpa"
    sink = MemorySink()
    turns = Turns.from_spec(spec)
    clock = TurnClock(turns)
    recipe = FinetuneRecipe(cfg, Path(spec["tmp"]), sink, step_hooks=[clock])
    recipe.setup()
    turns.ready()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    precision = "bf16" if recipe.autocast_dtype is torch.bfloat16 else "fp32"
    warns = [text for level, text, _ in sink.messages if level == "warn"]
    return summarize(
        name, clock.steps, spec["warmup"], {"precision": precision, "trainer": "sqft FinetuneRecipe", "warnings": warns}
    )
