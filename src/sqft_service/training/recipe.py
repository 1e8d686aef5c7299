"""The one training recipe: setup -> train -> save_checkpoint -> cleanup (torchtune's shape).

A flat loop that every method shares. The methods plug in at two points only:
``adapters.lora.build_peft_model`` builds the adapters (LoRA, NLS elastic ranks, SparsePEFT) and
returns ``AdapterHandles``; the loop calls ``handles.nls.sample(step)`` before an optimizer step
and ``handles.nls.record_loss(loss)`` after it. Everything the job reports goes through an
:class:`EventSink`, so this module knows nothing about HTTP or the database.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ..adapters.lora import AdapterConfigError, AdapterHandles, build_peft_model
from ..adapters.nls import STATS_FILE, write_elastic_adapter_config
from ..adapters.qa import QUANT_FILE
from ..config import FinetuneConfig
from ..job_secrets import redacted_json
from ..threads import configure_torch_threads
from ..workspace import TrainingOutputs, staged
from . import precision
from .attention import choose_attention
from .batching import Collator, length_grouped_batches
from .compiled import compile_decoder_layers
from .device import describe_device, device_batch, resolve_device
from .distributed import DataParallel
from .events import EventSink
from .hooks import StepHook, StepStats
from .image_features import cache_image_features
from .images import ImageInputs, load_image_inputs, text_input_grads_only
from .loss import LossOutput, causal_lm_loss
from .memory import ForwardSplit, free_cached, in_fitting_batches, peak_gib
from .models import load_base_model, load_tokenizer, resolve_model_dir
from .packing import PackingCollator, separates_packed_examples
from .preference import PairCollator, PreferencePair, dpo_loss, sequence_logps, tokenize_pairs
from .records import (
    IMAGES_UNPACKED,
    DataValidationError,
    load_records,
    record_format,
    record_images,
    wrong_format,
)
from .resume import TrainerState, latest_resume_point
from .step_totals import PendingStep, StepTotals
from .tokenization import TokenizedExample, split_train_eval, tokenize_records

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "step",
    "epoch",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "tokens_per_s",
]


# The reference log-probabilities of a preference job's pairs (training/preference.py), kept for a resume.
REFERENCE_FILE = ".sqft_dpo_reference.safetensors"


class TrainingStopped(Exception):
    """Raised inside the loop when the job was asked to stop (cancel)."""


@dataclass
class TrainingResult:
    steps: int
    trained_tokens: int
    adapter_dir: str
    metrics_csv: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class FinetuneRecipe:
    """Fine-tune a causal LM with adapters on instruction data, single process.

    Args:
        cfg: the resolved job configuration.
        output_dir: where adapters, checkpoints, metrics and search files go.
        sink: receives messages, metrics, checkpoints and progress.
        model_cache_dir: where converted GGUF models are cached.
        should_stop: polled between steps; True ends training with :class:`TrainingStopped`.
        step_hooks: objects with ``before_step(step)`` and ``after_step(step, stats)``
            (:class:`~sqft_service.training.hooks.StepHook`), called around every optimizer step,
            outside its timing; ``stats`` is a :class:`~sqft_service.training.hooks.StepStats`.
        resume_every_s: write the rolling resume point at most this often (None: only on stop).
            Training always resumes from the most advanced resumable checkpoint in ``output_dir``.
    """

    unit = "examples"  # what the data's items are called in messages
    updates_per_batch = 1  # optimizer steps each global batch trains (rl_recipe: several per sampling)

    def __init__(
        self,
        cfg: FinetuneConfig,
        output_dir: Path,
        sink: EventSink,
        *,
        model_cache_dir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        step_hooks: Iterable[StepHook] = (),
        resume_every_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.outputs = TrainingOutputs(self.output_dir)
        self.sink = sink
        self.model_cache_dir = model_cache_dir
        self.should_stop = should_stop
        self.step_hooks: list[StepHook] = list(step_hooks)
        self.resume_every_s = resume_every_s
        self._last_resume_save = 0.0
        self.seed = cfg.Training.seed if cfg.Training.seed is not None else 42
        self.handles = AdapterHandles()
        self._metric_rows: list[dict[str, Any]] = []
        self._unsettled: list[PendingStep] = []  # steps whose loss is still on the device
        # One rank of a data-parallel group when torch.distributed is initialised (training/distributed.py).
        self.dp = DataParallel.current()
        self.forward_split = ForwardSplit()  # more passes per micro-batch after running out of memory
        self.preference = cfg.Training.method == "dpo"
        self._untimed_s = 0.0  # seconds of the coming step spent in _collate by a subclass (rl_recipe)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(self.seed)
        self._configure_threads()
        self.device = resolve_device(cfg.Training.device)
        # On the CPU nothing is queued, so reading a step's loss at once costs nothing; on a GPU it
        # would stall the queue every step (training/step_totals.py).
        self.read_losses_every_step = self.device.type == "cpu"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Redacted: outputs are shared and copied around; the token stays in the job's secrets file.
        if self.dp.is_main:
            self.outputs.training_config.write_text(redacted_json(cfg.model_dump(mode="json")))

        model_ref = cfg.General.base_model or ""
        model_dir = resolve_model_dir(model_ref, self.model_cache_dir)
        load = cfg.General.config
        self.tokenizer = load_tokenizer(
            model_dir, cfg.General.tokenizer_name, trust_remote_code=load.trust_remote_code, token=load.token
        )
        self.model_dir = model_dir
        self.images: ImageInputs | None = None  # an image-text model's processor, for data with images
        self._images_cut = 0  # examples dropped because truncation would cut into their images
        self.train_examples, self.eval_examples = self._load_data()

        self.sink.message(f"loading base model {model_ref}")
        base = load_base_model(model_dir, trust_remote_code=load.trust_remote_code, token=load.token)
        warn = lambda text: self.sink.message(text, "warn")  # noqa: E731
        self.autocast_dtype = precision.autocast_dtype(cfg.Training.mixed_precision, warn, self.device.type)
        self.longest_row = self._longest_row()
        self._choose_attention(base)
        if cfg.General.enable_gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        if cfg.Dataset.packing and not separates_packed_examples(base):
            raise AdapterConfigError(
                "this model's attention does not keep packed examples apart (it ignores position_ids); "
                "train with packing off",
                param="Dataset.packing",
            )
        self.model, self.handles = build_peft_model(base, cfg.General.lora_config, seed=self.seed)
        if self.images is not None and cfg.General.enable_gradient_checkpointing:
            text_input_grads_only(base)  # no backward through the frozen vision tower
        self._place_model()
        if self.images is not None:
            self._cache_image_features()
        if cfg.Training.torch_compile:
            n_layers = compile_decoder_layers(self.model)
            self.sink.message(f"torch.compile: {n_layers} decoder layers (dynamic shapes); the first steps compile")
        self.model.train()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        self.sink.message(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.3f}%)")

        t = cfg.Training
        # No rounding of lengths up to a multiple of 8: on the CPU it only adds padding, and on a GPU the
        # GEMMs' row count (batch x length) needs no alignment; their other dimensions are the model's.
        self.collator = Collator.from_config(self.tokenizer, cfg.Dataset, pad_to_multiple_of=None, images=self.images)
        if cfg.Dataset.packing:
            # Rows as long as max_length rather than the batch's longest example: fewer rows beat the
            # extra masked attention (one 8-batch comparison on SmolLM2/ARC-E: 121 vs 107 tok/s).
            self.collator = PackingCollator(
                self.collator.pad_token_id, self.longest_row, track_examples=self.preference
            )
        if self.preference:
            self.collator = PairCollator(self.collator)
        global_batch = t.batch_size * t.gradient_accumulation_steps * self.dp.world_size
        self.steps_per_epoch = math.ceil(len(self.train_examples) / global_batch) * self.updates_per_batch
        if self.dp.enabled:
            on = " (one GPU each)" if self.device.type == "cuda" else ""
            self.sink.message(
                f"data-parallel over {self.dp.world_size} ranks{on}: global batch {global_batch} examples per step "
                f"({t.batch_size} x {t.gradient_accumulation_steps} accumulation x {self.dp.world_size} ranks)"
            )
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_train_steps is not None:
            self.total_steps = min(self.total_steps, t.max_train_steps)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        # fp16 (not bf16) needs loss scaling on a GPU: its small gradients underflow otherwise.
        fp16_on_gpu = self.device.type == "cuda" and self.autocast_dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler("cuda") if fp16_on_gpu else None

    def _longest_row(self) -> int:
        """Tokens in the longest row of a batch: the longest example, or the packing capacity."""
        longest = max(_longest_sequence(e) for e in self.train_examples)
        return max(self.cfg.Dataset.max_length, longest) if self.cfg.Dataset.packing else longest

    def _choose_attention(self, base: torch.nn.Module) -> None:
        t = self.cfg.Training
        chosen = choose_attention(
            base, t.attn_implementation, self.device, self.autocast_dtype, t.batch_size, self.longest_row
        )
        self.sink.message(f"attention: {chosen} (attn_implementation {t.attn_implementation!r})")

    def _place_model(self) -> None:
        """Store the frozen base in the job's precision and move the model to the job's device.

        The cast happens on the host, before the move, so the GPU never holds an fp32 copy of the base.
        """
        t = self.cfg.Training
        if self.autocast_dtype is not None:
            saved = precision.cast_frozen_linears(self.model, self.autocast_dtype)
            self.sink.message(f"frozen base weights stored in {self.autocast_dtype} ({saved / 2**20:.0f} MiB saved)")
        if self.device.type != "cpu":
            self.model.to(self.device)
            if self.handles.nls is not None:
                self.handles.nls.to(self.device)
        self.sink.message(
            f"training on {describe_device(self.device)} in {precision.precision_name(self.autocast_dtype)} "
            f"(mixed_precision {t.mixed_precision!r})",
            data={
                "device": str(self.device),
                "device_name": self._device_name(),
                "precision": precision.precision_name(self.autocast_dtype),
            },
        )

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _configure_threads(self) -> None:
        t = self.cfg.Training
        cpus = (t.resources_per_worker or {}).get("CPU")
        threads = configure_torch_threads(t.num_threads or (max(1, int(cpus)) if cpus else None))
        self.sink.message(f"using {threads} intra-op thread(s)")

    def _load_data(self) -> tuple[list, list]:
        ds = self.cfg.Dataset
        train_records = load_records(ds.train_file)
        self._check_format(train_records, "training_file")
        if ds.max_train_samples is not None:
            train_records = train_records[: ds.max_train_samples]
        eval_records = load_records(ds.validation_file) if ds.validation_file else None
        self._read_images([*train_records, *(eval_records or ())])
        train = self._tokenize(train_records, ds.train_file)
        if eval_records is not None:
            self._check_format(eval_records, "validation_file")
            evals = self._tokenize(eval_records, ds.validation_file)
        else:
            train, evals = split_train_eval(train, ds.validation_split_percentage, self.seed)
        if ds.max_eval_samples is not None:
            evals = evals[: ds.max_eval_samples]
        if not train:
            cut = (
                " (or of their images: raise `Dataset.max_source_length` and `max_length`)" if self._images_cut else ""
            )
            raise DataValidationError(f"no training example has a token left to learn after truncation{cut}")
        n_tokens = sum(len(e) for e in train)
        unit = "preference pairs" if self.preference else self.unit
        self.sink.message(
            f"data: {len(train)} training and {len(evals)} validation {unit}, "
            f"{n_tokens:,} training tokens (mean {n_tokens / len(train):.1f} per {unit[:-1]})"
        )
        return train, evals

    def _read_images(self, records: list[dict]) -> None:
        """Load the model's processor when the records have images (``training/images.py``)."""
        n_images = sum(len(record_images(r)) for r in records)
        if not n_images:
            return
        if self.cfg.Dataset.packing:
            raise DataValidationError(IMAGES_UNPACKED, param="Dataset.packing")
        load = self.cfg.General.config
        self.images = load_image_inputs(self.model_dir, trust_remote_code=load.trust_remote_code, token=load.token)
        self.sink.message(f"images: {n_images} in the data, read by the model's {type(self.images.processor).__name__}")

    def _cache_image_features(self) -> None:
        """The images' features once, the vision tower being frozen (``training/image_features.py``)."""
        t0 = time.perf_counter()
        examples = [*self.train_examples, *self.eval_examples]
        cached = cache_image_features(self.model, self.images, examples, self.device, self._autocast)
        if isinstance(cached, str):
            self.sink.message(f"image features computed every batch: {cached}")
            return
        n_images, size = cached
        self.sink.message(
            f"image features of {n_images} images computed once in {time.perf_counter() - t0:.1f} s "
            f"({size / 2**20:.0f} MiB kept): the vision tower is frozen, so no batch reads its pixels again"
        )

    def _check_format(self, records: list[dict], param: str) -> None:
        """Each method takes its record formats (``records.METHOD_FORMATS``; the API checks it first)."""
        if why := wrong_format(self.cfg.Training.method, record_format(records[0], 1)):
            raise DataValidationError(f"this file {why}", param=param)

    def _tokenize(self, records: list[dict], source: str | None) -> list:
        if self.preference:
            examples, dropped = tokenize_pairs(records, self.tokenizer, self.cfg.Dataset)
        else:
            tokenized = tokenize_records(records, self.tokenizer, self.cfg.Dataset, images=self.images)
            examples, dropped = tokenized.examples, tokenized.n_dropped
            self._images_cut += tokenized.n_images_cut
            if tokenized.n_images_cut:
                self.sink.message(
                    f"{tokenized.n_images_cut} example(s) of {Path(source or '').name} were skipped: truncation "
                    "would cut into their images' tokens (raise `Dataset.max_source_length` and `max_length`)",
                    level="warn",
                )
                dropped -= tokenized.n_images_cut
        if dropped:
            what = "pair(s)" if self.preference else "example(s)"
            self.sink.message(
                f"{dropped} {what} of {Path(source or '').name} have no response token left after "
                "truncation and were skipped",
                level="warn",
            )
        return examples

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.Training
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        # foreach=True: one fused multi-tensor update instead of a Python loop over ~200 adapter tensors;
        # on a GPU, fused=True: the whole update in one kernel per dtype group.
        fused = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, **fused)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        from transformers import get_scheduler

        t = self.cfg.Training
        return get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=self.total_steps,
        )

    # ----------------------------------------------------------------- train
    def _batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(e) for e in self.train_examples]
        # Global micro-batches (every rank's examples together); each rank trains its `dp.shard`.
        return length_grouped_batches(
            lengths,
            self.cfg.Training.batch_size * self.dp.world_size,
            seed=self.seed,
            epoch=epoch,
            group_by_length=self.cfg.Dataset.group_by_length,
        )

    def _forward(self, batch: dict[str, Any]) -> LossOutput:
        with self._autocast():
            if self.preference:
                t = self.cfg.Training
                return dpo_loss(self.model, batch, t.dpo_beta, t.dpo_loss, t.dpo_label_smoothing, t.dpo_simpo_gamma)
            return causal_lm_loss(self.model, batch)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _my_share(self, examples: Sequence[Any]) -> list[int]:
        """This rank's indices of a no-grad pass over ``examples``: shortest first, in global batches
        sharded as in training."""
        bs = self.cfg.Training.batch_size * self.dp.world_size
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        return [i for first in range(0, len(order), bs) for i in self.dp.shard(order[first : first + bs])]

    @torch.no_grad()
    def _set_reference(self) -> None:
        """Give every preference pair its reference log-probabilities: those of the model before training.

        Run before a resume loads trained weights, so the model is the reference still; kept in
        ``output_dir`` all the same, so that a resumed job need not score every pair again.
        """
        pairs: list[PreferencePair] = [*self.train_examples, *self.eval_examples]
        path = self.output_dir / REFERENCE_FILE
        kept = load_safetensors(str(path))["logps"] if path.exists() else None
        if kept is None or tuple(kept.shape) != (len(pairs), 2):
            t0 = time.perf_counter()
            kept = self._score_reference(pairs)
            if self.dp.is_main:
                save_safetensors({"logps": kept}, str(path))
            self.sink.message(
                f"DPO reference: log-probabilities of {len(pairs)} pairs' replies in {time.perf_counter() - t0:.1f} s "
                f"(beta {self.cfg.Training.dpo_beta}, loss {self.cfg.Training.dpo_loss})"
            )
        for pair, (chosen, rejected) in zip(pairs, kept.tolist(), strict=True):
            pair.reference = (chosen, rejected)

    def _score_reference(self, pairs: list[PreferencePair]) -> torch.Tensor:
        self.model.eval()  # no dropout: the reference is the model itself
        if self.handles.nls is not None:
            self.handles.nls.activate_maximal()
        mine = self._my_share(pairs)

        def score(chunk: Sequence[int]) -> tuple[Sequence[int], torch.Tensor]:
            with self._autocast():
                return chunk, sequence_logps(self.model, self._prepare(self.collator([pairs[i] for i in chunk])))

        logps = torch.zeros(len(pairs), 2, dtype=torch.float64)
        for chunk, values in in_fitting_batches(mine, self.cfg.Training.batch_size, score, self.device):
            logps[list(chunk)] = values.double().cpu()
        self.model.train()
        return torch.tensor(self.dp.sum(logps.flatten().tolist()), dtype=torch.float32).view(-1, 2)

    def train(self) -> TrainingResult:
        t = self.cfg.Training
        accum = t.gradient_accumulation_steps
        if self.preference and t.dpo_loss != "simpo":  # SimPO has no reference model
            self._set_reference()
        resumed = self._resume()
        step = resumed.step if resumed else 0
        self.dp.check_same("the step to resume from", step)
        trained_tokens = resumed.trained_tokens if resumed else 0
        first_epoch = resumed.epoch if resumed else 0
        # Within the epoch it stopped in, skip the optimizer steps already taken (an epoch's batches
        # depend on (seed, epoch) only, so they are the same batches in the same order).
        skip_groups = step - first_epoch * self.steps_per_epoch
        window: deque[tuple[float, int]] = deque(maxlen=20)  # (seconds, real tokens) of recent steps
        started = time.time()
        self._last_resume_save = time.monotonic()
        self.sink.message(f"training for {self.total_steps} steps ({t.epochs} epoch(s), {self.steps_per_epoch}/epoch)")
        for epoch in range(first_epoch, t.epochs):
            micro_batches = self._batches(epoch)
            start = skip_groups * accum if epoch == first_epoch else 0
            for first in range(start, len(micro_batches), accum):
                if step >= self.total_steps:
                    break
                shards = [self.dp.shard(idx) for idx in micro_batches[first : first + accum]]
                group = self._collate(shards)
                # Rank 0 decides for every rank: all stop at the same step boundary. Each rank's NLS
                # sub-adapter goes in the header to be checked equal; it is activated only if the step runs.
                drawn = self.handles.nls.draw(step) if self.handles.nls is not None and self.dp.enabled else None
                header = self.dp.step_header(
                    self.should_stop(),
                    step,
                    drawn,
                    sum(b["n_label_tokens"] for b in group),
                    sum(b["n_real_tokens"] for b in group),
                )
                if header.stop:
                    self.save_resume_state(step, epoch, trained_tokens)
                    raise TrainingStopped(f"stopped at step {step}")
                for hook in self.step_hooks:
                    hook.before_step(step + 1)
                t0 = time.perf_counter()
                if self.handles.nls is not None:
                    self.handles.nls.sample(step, drawn)
                if self.dp.enabled:  # each rank its own dropout masks, the same ones again after a resume
                    torch.manual_seed(self.dp.dropout_seed(self.seed, step))
                totals = self._train_step(group, header.n_labels, t.max_grad_norm, shards, step)
                n_labels, n_real = header.n_labels, header.n_real
                step += 1
                # Work a subclass did for the step before it was timed (reinforcement's sampling) counts too.
                dt = time.perf_counter() - t0 + self._untimed_s
                self._untimed_s = 0.0
                trained_tokens += n_real
                window.append((dt, n_real))
                nls_ranks = list(self.handles.nls.active) if self.handles.nls is not None else None
                pending = PendingStep(totals, n_labels, nls_ranks)
                row = self._log_step(step, epoch, pending, window, trained_tokens, started)
                if self.step_hooks:
                    stats = StepStats(
                        step=step,
                        epoch=epoch,
                        seconds=dt,
                        real_tokens=n_real,
                        padded_tokens=totals.padded_tokens,
                        label_tokens=n_labels,
                        loss=pending.loss,
                    )
                    for hook in self.step_hooks:
                        hook.after_step(step, stats)
                if self.eval_examples and t.eval_steps and step % t.eval_steps == 0:
                    row.update(self.evaluate())
                    self._emit_metrics(row)
                if self.cfg.General.save_strategy == "steps" and step % self.cfg.General.save_steps == 0:
                    self.save_checkpoint(step, epoch, row, trained_tokens)
                elif self._resume_save_due() or step == self.total_steps:
                    # After the last step too: a stop during the final evaluation and saves then
                    # resumes there instead of retraining from the last rolling point.
                    self.save_resume_state(step, epoch, trained_tokens)
            self._settle_losses()
            epoch_row: dict[str, Any] = {"step": step, "epoch": epoch + 1}
            if self.eval_examples:
                epoch_row.update(self.evaluate())
                self._emit_metrics(epoch_row)
            if self.cfg.General.save_strategy == "epoch" and step > 0:
                self.save_checkpoint(step, epoch + 1, self._last_row() | epoch_row, trained_tokens)
            if step >= self.total_steps:
                break
        self._settle_losses()
        final = self._last_row()
        if self.handles.nls is not None:
            # The cheap search signals (draw counts and loss per sampled rank) for later sub-adapter selection.
            self.sink.metrics({"step": step, "nls_stats": self.handles.nls.stats()})
        adapter_dir = self.save_adapter(self.outputs.adapter)
        self.sink.checkpoint(step, str(adapter_dir), {**self._checkpoint_metrics(final), "final": True})
        csv_path = self.write_metrics_csv()
        return TrainingResult(step, trained_tokens, str(adapter_dir), str(csv_path))

    def _collate(self, shards: list[list[int]]) -> list[dict[str, Any]]:
        """A step's passes, ready for the device: this rank's shards, each in ``forward_split`` passes."""
        return [
            self._prepare(self.collator([self.train_examples[i] for i in idx]))
            for idx in self.forward_split.shards(shards)
        ]

    def _train_step(
        self,
        group: list[dict[str, Any]],
        n_labels: int,
        max_grad_norm: float | None,
        shards: list[list[int]] | None = None,
        step: int = 0,
    ) -> StepTotals:
        """One optimizer step over ``group`` passes; ``n_labels``: the global step's label tokens.

        The loss is a mean over every label token of the whole step (not a mean of per-batch means),
        so gradient accumulation gives the same update as one big batch: each pass's summed loss is
        divided by the step's total label count before backward. With data parallelism that count is
        summed over the ranks and so are the gradients, which gives the update of one rank training
        the global batch. A pass that runs out of device memory is retried with the step's ``shards``
        in more passes (``training/memory.py``): the same update, before any collective. Returns the
        global step's loss totals, still on the device (read them with ``totals.read()``).
        """
        scaler = self.grad_scaler
        while True:
            try:
                loss_sums, corrects, margins = self._accumulate(group, n_labels)
                break
            except torch.OutOfMemoryError as exc:
                if shards is None:
                    raise
                error = (str(exc).splitlines() or ["OutOfMemoryError"])[0][:300]
            # Out of the except block: the failed pass's activations went with its traceback.
            group = []
            self.optimizer.zero_grad(set_to_none=True)
            free_cached(self.device)
            self.sink.message(self.forward_split.widen(shards, self.device, step + 1, error), level="warn")
            if self.dp.enabled:
                torch.manual_seed(self.dp.dropout_seed(self.seed, step))
            group = self._collate(shards)
        # The passes that ran the step, split or not.
        totals = StepTotals(loss_sums, corrects, margins, sum(b["n_padded_tokens"] for b in group))
        if self.dp.enabled:  # the ranks' totals summed with the gradients, still not read
            zero = torch.zeros((), device=self.device)
            kept = (loss_sums, corrects, margins) if self.preference else (loss_sums, corrects)
            step_sums = [torch.stack(v).sum() if v else zero for v in kept]
            summed = self.dp.all_reduce_grads(self.optimizer.param_groups[0]["params"], step_sums)
            totals = StepTotals(summed[:1], summed[1:2], summed[2:], padded_tokens=totals.padded_tokens)
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], max_grad_norm, foreach=True)
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the update when a gradient overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _accumulate(self, group: list[dict[str, Any]], n_labels: int) -> tuple[list, list, list]:
        """Forward and backward every pass of a step; its loss sums, correct counts and (DPO) reward
        margin sums, on the device."""
        scaler = self.grad_scaler
        loss_sums, corrects, margins = [], [], []
        for batch in group:
            out = self._forward(batch)
            loss = out.loss_sum / max(n_labels, 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sums.append(out.loss_sum.detach())
            corrects.append(out.n_correct)
            if out.reward_sums is not None:
                margins.append(out.reward_sums[0] - out.reward_sums[1])
        return loss_sums, corrects, margins

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch ready for the device: unchanged on the CPU, :func:`device_batch` on a GPU."""
        return batch if self.device.type == "cpu" else device_batch(batch, self.device)

    def _settle_losses(self) -> None:
        """Read the losses of the steps not read yet: fill their rows and the NLS search statistics."""
        for pending in self._unsettled:
            loss, _ = pending.settle()
            if self.handles.nls is not None:
                self.handles.nls.record_loss(loss, pending.nls_ranks)
        self._unsettled.clear()

    def _log_step(
        self,
        step: int,
        epoch: int,
        pending: PendingStep,
        window: deque[tuple[float, int]],
        trained_tokens: int,
        started: float,
    ) -> dict[str, Any]:
        secs = sum(w[0] for w in window)
        tokens_per_s = sum(w[1] for w in window) / secs if secs > 0 else 0.0
        step_s = secs / len(window)
        eta_s = (self.total_steps - step) * step_s
        row = {
            "step": step,
            "epoch": round(epoch + (step - epoch * self.steps_per_epoch) / max(self.steps_per_epoch, 1), 4),
            "total_steps": self.total_steps,
            "train_loss": None,  # filled by _settle_losses
            "train_accuracy": None,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_s, 2),
            "step_s": round(step_s, 4),
            "eta_s": round(eta_s, 1),
            "elapsed_s": round(time.time() - started, 1),
            "gpu_peak_memory_gib": peak_gib(self.device),  # None on the CPU: not emitted
            **self._step_metrics(),
        }
        self._metric_rows.append(row)
        pending.row = row
        self._unsettled.append(pending)
        self.sink.progress(trained_tokens, time.time() + eta_s)
        log_now = step == 1 or step % self.cfg.Training.logging_steps == 0 or step == self.total_steps
        if log_now or self.read_losses_every_step:  # a GPU's losses are read at logging points only
            self._settle_losses()
        if log_now:
            self._emit_metrics(row)
        return row

    def _step_metrics(self) -> dict[str, Any]:
        """More figures for the step's row (a subclass's: reinforcement's rewards)."""
        return {}

    def _emit_metrics(self, row: dict[str, Any]) -> None:
        self.sink.metrics({k: v for k, v in row.items() if v is not None})

    def _last_row(self) -> dict[str, Any]:
        return dict(self._metric_rows[-1]) if self._metric_rows else {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self._settle_losses()
        self.model.eval()
        if self.handles.nls is not None:
            self.handles.nls.activate_maximal()
        mine = self._my_share(self.eval_examples)

        def score(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
            batch = self._prepare(self.collator([self.eval_examples[i] for i in chunk]))
            out = self._forward(batch)
            return out.loss_sum, out.n_correct, batch["n_label_tokens"], out.reward_sums

        # This rank's shards in turn (a batch that runs out of device memory is halved: the same sums),
        # read once at the end (StepTotals), not after every batch.
        parts = in_fitting_batches(mine, self.cfg.Training.batch_size, score, self.device)
        loss_sum, correct = StepTotals([p[0] for p in parts], [p[1] for p in parts]).read()
        n_labels = sum(p[2] for p in parts)
        rewards = [p[3] for p in parts if p[3] is not None]
        chosen, rejected = torch.stack(rewards).sum(0).tolist() if rewards else (0.0, 0.0)
        loss_sum, correct, n_labels, chosen, rejected = self.dp.sum([loss_sum, correct, n_labels, chosen, rejected])
        self.model.train()
        n = max(n_labels, 1)
        metrics = {"valid_loss": round(loss_sum / n, 6), "valid_mean_token_accuracy": round(correct / n, 6)}
        if self.preference:  # TRL's rewards/chosen, rewards/rejected, rewards/margins, per pair
            metrics |= {
                "valid_reward_chosen": round(chosen / n, 6),
                "valid_reward_rejected": round(rejected / n, 6),
                "valid_reward_margin": round((chosen - rejected) / n, 6),
            }
        if self._metric_rows:
            self._metric_rows[-1].update(metrics)
        return metrics

    # ------------------------------------------------------------- checkpoints
    def save_adapter(self, directory: Path) -> Path:
        """Save the adapter in standard PEFT format, plus the SQFT search files for NLS jobs (rank 0 only)."""
        if not self.dp.is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        (directory / "training_config.json").write_text(redacted_json(self.cfg.model_dump(mode="json")))
        if self.handles.nls is not None:
            write_elastic_adapter_config(self.handles.nls, self.cfg.General.lora_config, directory)
            self.handles.nls.save_stats(directory / STATS_FILE)
        if self.handles.quant is not None:  # the merge quantizes with these (adapters/qa)
            self.handles.quant.save(directory, once_at=self.output_dir / f".{QUANT_FILE}")
        return directory

    def _trainer_state(self, step: int, epoch: int, trained_tokens: int) -> TrainerState:
        self._settle_losses()  # the saved metric rows and NLS statistics must hold every step's loss
        return TrainerState(
            step=step,
            epoch=epoch,
            trained_tokens=trained_tokens,
            metric_rows=self._metric_rows,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            nls=self.handles.nls.state_dict() if self.handles.nls is not None else None,
        )

    def _save_resumable(self, target: Path, state: TrainerState) -> Path:
        """Adapter + trainer state, built beside ``target`` and put in place by one rename (rank 0 only)."""
        if not self.dp.is_main:
            return target
        with staged(target) as staging:
            self.save_adapter(staging)
            state.save(staging)
        return target

    def save_checkpoint(self, step: int, epoch: int, row: dict[str, Any], trained_tokens: int = 0) -> Path:
        """A listed checkpoint (OpenAI's ``checkpoints``) that training can also resume from exactly."""
        directory = self._save_resumable(
            self.outputs.checkpoint(step), self._trainer_state(step, epoch, trained_tokens)
        )
        self.sink.checkpoint(step, str(directory), self._checkpoint_metrics(row))
        return directory

    def save_resume_state(self, step: int, epoch: int, trained_tokens: int) -> None:
        """The rolling resume point: not listed as a checkpoint, rewritten in place."""
        self._save_resumable(self.outputs.resume_state, self._trainer_state(step, epoch, trained_tokens))
        self._last_resume_save = time.monotonic()

    def _resume_save_due(self) -> bool:
        every = self.resume_every_s
        return every is not None and time.monotonic() - self._last_resume_save >= every

    def _resume(self) -> TrainerState | None:
        """Continue from the most advanced resumable checkpoint in the output dir, if there is one."""
        point = latest_resume_point(self.outputs)
        if point is None:
            return None
        directory, step = point
        state = TrainerState.load(directory)
        adapter = directory / "adapter_model.safetensors"
        set_peft_model_state_dict(self.model, load_safetensors(str(adapter)))
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.handles.nls is not None and state.nls is not None:
            self.handles.nls.load_state_dict(state.nls)
        self._metric_rows = list(state.metric_rows)
        self.sink.message(f"resuming from step {step} of {self.total_steps} ({directory.name})", data={"step": step})
        return state

    @staticmethod
    def _checkpoint_metrics(row: dict[str, Any]) -> dict[str, Any]:
        keys = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
        metrics = {k: row.get(k) for k in keys}
        metrics["train_mean_token_accuracy"] = row.get("train_accuracy")
        return metrics

    def write_metrics_csv(self) -> Path:
        path = self.outputs.metrics_csv
        if not self.dp.is_main:
            return path
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self._metric_rows:
                writer.writerow(row)
        return path

    def cleanup(self) -> None:
        if self.handles.nls is not None:
            self.handles.nls.remove()


def run_training(
    cfg: FinetuneConfig,
    output_dir: Path,
    sink: EventSink,
    *,
    model_cache_dir: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    resume_every_s: float | None = None,
    judges: dict[str, Any] | None = None,
) -> TrainingResult:
    """Train ``cfg`` to the end. ``judges``: a reinforcement job's model grader's judge (its ModelSpec by
    name, as the engine loads it)."""
    kwargs: dict[str, Any] = {}
    recipe_class = FinetuneRecipe
    if cfg.Training.method == "reinforcement":
        from .rl_recipe import ReinforcementRecipe

        recipe_class, kwargs = ReinforcementRecipe, {"judges": judges or {}}
    recipe = recipe_class(
        cfg,
        output_dir,
        sink,
        model_cache_dir=model_cache_dir,
        should_stop=should_stop,
        resume_every_s=resume_every_s,
        **kwargs,
    )
    recipe.setup()
    try:
        result = recipe.train()
    finally:
        recipe.cleanup()
    return result


def _longest_sequence(example: TokenizedExample | PreferencePair) -> int:
    """Tokens in the example's longest sequence (a preference pair holds two)."""
    return example.longest if isinstance(example, PreferencePair) else len(example)
