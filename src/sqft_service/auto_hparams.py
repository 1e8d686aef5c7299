"""The "auto" hyperparameters: what a job trains with when the client leaves a value unset.

The rule was chosen by experiment (``bench/auto_hparams.py``; the table is in the README, section
"Auto hyperparameters"), not guessed: on SmolLM2-135M with ARC-E and GSM8K subsets it reaches a lower
validation loss than the reference's defaults and than a fixed "batch 8, 2e-4, r 16" setting.

Only fields the client did not send are chosen; "sent" is pydantic's ``model_fields_set``, so a
reference payload that spells out ``Training.batch_size: 2`` keeps 2, while one that omits it gets the
rule. The schedule (cosine with warmup) belongs to the rule's learning rate, so a client who chooses
the rate keeps the section's schedule. Neural Low-rank Adapter Search jobs keep their rank: their
``search_space`` is written against ``r``. Target modules stay ``None``, which the recipe resolves per
model to every attention and MLP projection (``adapters/lora.py``); the experiment trained with them.
Torch-free: the API resolves a job's configuration with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .training.tokenization import held_out_count  # torch-free, as this module must stay

if TYPE_CHECKING:
    from .config import DatasetSection, FinetuneConfig

# Optimizer steps the rule aims for in one epoch; fewer, and the batch halves (down to MIN_BATCH).
TARGET_STEPS_PER_EPOCH = 32
MAX_BATCH = 8
MIN_BATCH = 2  # the reference's default batch, which tiny data sets (and the test suite's jobs) keep
EPOCHS = 1
# Data sets of up to SMALL_DATA examples get a second pass: measured better on 60, 260, 600 and 1,000
# examples, and a third pass gained little or lost (README "Auto hyperparameters",
# bench/results/2026-11-28-auto-hparams-epochs-vm.json). Larger ones were not measured: one pass keeps
# their cost as it was.
SMALL_DATA = 1000
SMALL_DATA_EPOCHS = 2
LEARNING_RATE = 5e-4
LR_SCHEDULER = "cosine"
WARMUP_FRACTION = 0.06  # of the optimizer steps
RANK = 16
ALPHA_PER_RANK = 2  # lora_alpha = 2 r: the LoRA scale alpha / r is 2 (the reference's 16 / 8) at any rank


@dataclass(frozen=True)
class AutoChoice:
    """What the rule picks for one data set (every value; :func:`apply` decides which are used)."""

    epochs: int
    batch_size: int
    learning_rate: float
    lr_scheduler: str
    r: int


def choose(n_examples: int) -> AutoChoice:
    """The rule: from the number of training examples to the auto values.

    Args:
        n_examples: Training examples per epoch (after the validation split).

    Returns:
        The chosen values; the warmup follows from them in :func:`apply`.
    """
    batch = MAX_BATCH
    while batch > MIN_BATCH and math.ceil(max(n_examples, 1) / batch) < TARGET_STEPS_PER_EPOCH:
        batch //= 2
    epochs = SMALL_DATA_EPOCHS if n_examples <= SMALL_DATA else EPOCHS
    return AutoChoice(epochs=epochs, batch_size=batch, learning_rate=LEARNING_RATE, lr_scheduler=LR_SCHEDULER, r=RANK)


def training_examples(n_records: int, dataset: DatasetSection, has_validation_file: bool) -> int:
    """How many records one epoch trains on: capped by ``max_train_samples``, less the held-out split."""
    n = min(n_records, dataset.max_train_samples or n_records)
    return n if has_validation_file else n - held_out_count(n, dataset.validation_split_percentage)


def explicit_fields(cfg: FinetuneConfig) -> set[str]:
    """The dotted names of the Training and LoRA fields the client sent (pydantic's ``model_fields_set``)."""
    names = {f"Training.{f}" for f in cfg.Training.model_fields_set}
    return names | {f"General.lora_config.{f}" for f in cfg.General.lora_config.model_fields_set}


def apply(cfg: FinetuneConfig, n_examples: int, explicit: set[str]) -> FinetuneConfig:
    """A copy of ``cfg`` with each field not named in ``explicit`` set by the rule.

    Args:
        cfg: The configuration as the client sent it (section defaults for what it left out).
        n_examples: Training examples per epoch (:func:`training_examples`).
        explicit: Dotted names the client set, e.g. ``"Training.batch_size"`` (:func:`explicit_fields`
            plus the OpenAI hyperparameters that were not "auto").

    Returns:
        The configuration with the auto values filled in.
    """
    out = cfg.model_copy(deep=True)
    t, lora = out.Training, out.General.lora_config
    choice = choose(n_examples)
    if not explicit & {"Training.epochs", "Training.max_train_steps"}:
        t.epochs = choice.epochs
    if "Training.batch_size" not in explicit:
        # The rule's batch is per optimizer step; accumulation and workers multiply what a step sees.
        t.batch_size = max(1, choice.batch_size // (t.gradient_accumulation_steps * t.num_training_workers))
    if "Training.learning_rate" not in explicit:
        t.learning_rate = choice.learning_rate
        if "Training.lr_scheduler" not in explicit:
            t.lr_scheduler = choice.lr_scheduler  # type: ignore[assignment]
        if "Training.warmup_steps" not in explicit:
            t.warmup_steps = round(WARMUP_FRACTION * _optimizer_steps(cfg=out, n_examples=n_examples))
    if not lora.neural_lora_search:
        if "General.lora_config.r" not in explicit:
            lora.r = choice.r
        if "General.lora_config.lora_alpha" not in explicit:
            lora.lora_alpha = float(ALPHA_PER_RANK * lora.r)
    return out


def _optimizer_steps(cfg: FinetuneConfig, n_examples: int) -> int:
    t = cfg.Training
    per_step = t.batch_size * t.gradient_accumulation_steps * t.num_training_workers
    steps = math.ceil(max(n_examples, 1) / per_step) * t.epochs
    return min(steps, t.max_train_steps or steps)


# Tokens around an image's own in a prompt (Gemma 3 writes "\n\n<start_of_image>", then "<end_of_image>\n\n").
IMAGE_MARGIN_TOKENS = 8


# Tokens framing each tile of an Idefics3 (SmolVLM) image: "<fake_token_around_image><row_i_col_j>", a newline.
TILE_FRAME_TOKENS = 3


def image_tokens(model_dir: str | None) -> int | None:
    """Tokens one image can take in a prompt of an image-text model directory, from its ``config.json`` or
    processor settings: Gemma 3's ``mm_tokens_per_image`` (256); LLaVA-1.5's tower patches (576);
    Idefics3/SmolVLM's ``image_seq_len`` a tile, for as many tiles as its largest image splits into beside
    the whole (SmolVLM-256M: 17 x 64); Qwen2-VL's largest image (``max_pixels``) in merged patches (by
    default 16,384). None when the directory does not say."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    root = Path(model_dir)
    config, processor = json_object(root / "config.json"), json_object(root / "processor_config.json")
    per_block = config.get("mm_tokens_per_image") or processor.get("image_seq_length") or processor.get("image_seq_len")
    patch, size = _at(config, "vision_config", "patch_size"), _at(config, "vision_config", "image_size")
    if per_block is None and config.get("model_type") == "llava" and _positive(patch) and _positive(size):
        per_block = (size // patch) ** 2  # a CLIP tower's patches
    # transformers 5 saves the image processor's settings in processor_config.json, earlier ones beside it.
    reader = processor.get("image_processor") or json_object(root / "preprocessor_config.json")
    merge, pixels = _at(reader, "merge_size"), _at(reader, "max_pixels") or _at(reader, "size", "longest_edge")
    if per_block is None and _positive(merge) and _positive(_at(reader, "patch_size")) and _positive(pixels):
        # Qwen2-VL: an image resized to at most max_pixels, a token per merge x merge patches.
        return pixels // (reader["patch_size"] * merge) ** 2
    if not _positive(per_block):
        return None
    largest, tile = _at(reader, "size", "longest_edge"), _at(reader, "max_image_size", "longest_edge")
    if _at(reader, "do_image_splitting") and _positive(largest) and _positive(tile):
        side = math.ceil(largest / tile)
        return (side * side + (side > 1)) * (per_block + TILE_FRAME_TOKENS)
    return per_block


def json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a model directory's settings), or {} where it is missing, unreadable or
    not an object: the directory is the client's, and an odd file in it must not fail the request."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _at(settings: object, *keys: str) -> object:
    """``settings[keys[0]][keys[1]]...``, or None where a level is missing or not a mapping: a model
    directory's JSON is the client's, and an odd value in it must not fail the request."""
    for key in keys:
        settings = settings.get(key) if isinstance(settings, dict) else None
    return settings


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def fit_images(dataset: DatasetSection, max_images: int, per_image: int, sent: set[str] | None = None) -> list[str]:
    """Raise the length limits the client left unset (``sent``: the ``Dataset`` fields it sent, by default
    ``dataset.model_fields_set``) so that a record with ``max_images`` images of ``per_image`` tokens keeps
    the text room the defaults give; the changes, said."""
    need = max_images * (per_image + IMAGE_MARGIN_TOKENS)
    unset = {"max_source_length", "max_length"} - (dataset.model_fields_set if sent is None else sent)
    said = []
    for name in ("max_source_length", "max_length"):
        default = type(dataset).model_fields[name].default
        if name in unset and getattr(dataset, name) < default + need:
            setattr(dataset, name, default + need)
            said.append(f"`Dataset.{name}` {default + need}")
    if "max_source_length" in unset and dataset.max_source_length > dataset.max_length:
        dataset.max_source_length = dataset.max_length  # within the client's own max_length
    return said
