"""Tokenization with loss masking, and the train/eval split.

Each record (validated by :mod:`.records`, rendered by :mod:`.prompts`) becomes a
:class:`TokenizedExample` whose ``labels`` hold :data:`IGNORE_INDEX` wherever no loss is taken.
Torch-free: turning examples into tensors is :mod:`.batching` (padded) and :mod:`.packing` (packed).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .prompts import alpaca_prompt, chat_segments

if TYPE_CHECKING:
    from sqft_service.config import DatasetSection

# The label of a position that takes no loss (PyTorch's cross-entropy default ``ignore_index``).
# Defined only here so the collators, the loss and the tests cannot disagree on it.
IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training sequence; ``labels`` is ``IGNORE_INDEX`` (-100) where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset:
    """What :func:`tokenize_records` returns: the kept examples plus what happened to the rest.

    Attributes:
        examples: The examples, in record order (dropped ones left out).
        n_dropped: Records dropped because no label survived truncation and masking.
        n_truncated: Kept examples that were shortened.
        kept: The index of each example's record in the records given.
    """

    examples: list[TokenizedExample] = field(default_factory=list)
    n_dropped: int = 0
    n_truncated: int = 0
    kept: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[TokenizedExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(ex) for ex in self.examples]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's post-processor prepends BOS (Llama 2 does, SmolLM2 doesn't)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) >= 2 and ids[0] == bos


def _record_segments(
    record: dict[str, Any], tokenizer: Any, index: int, last_turn_only: bool
) -> tuple[list[tuple[str, bool]], bool]:
    """``(text, is_target)`` pieces of one record, and whether EOS must be appended to the target."""
    if "messages" not in record:
        return [(alpaca_prompt(record), False), (record["output"], True)], True
    segments = chat_segments(record["messages"], tokenizer, index, record.get("tools"))
    if last_turn_only:  # earlier assistant turns become context
        last = max(i for i, (_, target) in enumerate(segments) if target)
        segments = [(text, target and i == last) for i, (text, target) in enumerate(segments)]
    return segments, False


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer: Any, cfg: DatasetSection, *, last_turn_only: bool = False
) -> TokenizedDataset:
    """Tokenize validated records into masked training examples.

    Prompt and target pieces are tokenized separately (in one batched call) and concatenated, so the
    mask boundary falls exactly between them. The *source* is everything before the last target
    piece; it is truncated to ``cfg.max_source_length`` from ``cfg.truncation_side``, then the
    target is cut on the right to fit ``cfg.max_length`` (its beginning is what matters). With
    ``cfg.truncation`` false nothing is cut. ``cfg.mask_input`` masks non-target tokens,
    ``cfg.mask_response`` masks target tokens (then the prompt is trained). BOS is prepended to
    Alpaca prompts only when the tokenizer would add it itself; chat templates render their own.
    ``last_turn_only``: a conversation's last assistant turn is its only target (a preference pair's
    reply); otherwise every assistant turn is.

    Returns:
        A :class:`TokenizedDataset`; records whose labels (after the causal shift, i.e. beyond
        position 0) are all masked are dropped and counted in ``n_dropped``.

    Raises:
        DataValidationError: Chat records with a tokenizer that has no chat template.
    """
    eos_id = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    per_record: list[tuple[list[tuple[str, bool]], bool]] = [
        _record_segments(rec, tokenizer, i, last_turn_only) for i, rec in enumerate(records)
    ]
    texts = [text for segs, _ in per_record for text, _ in segs]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    out = TokenizedDataset()
    k = 0
    for index, (segs, add_eos) in enumerate(per_record):
        ids: list[int] = []
        target: list[bool] = []
        last_target_start = 0
        for _text, is_target in segs:
            piece = all_ids[k]
            k += 1
            if is_target:
                last_target_start = len(ids)
                if add_eos and eos_id is not None:
                    piece = [*piece, eos_id]
            ids.extend(piece)
            target.extend([is_target] * len(piece))
        # Chat templates render their own BOS; Alpaca text gets it only if the tokenizer adds one.
        prefix: list[int] = bos if add_eos else []
        src_ids, src_tgt = ids[:last_target_start], target[:last_target_start]
        tgt_ids, tgt_tgt = ids[last_target_start:], target[last_target_start:]
        n_before = len(prefix) + len(ids)
        if cfg.truncation:
            room = max(cfg.max_source_length - len(prefix), 0)
            if len(src_ids) > room:
                if cfg.truncation_side == "left":
                    src_ids, src_tgt = src_ids[len(src_ids) - room :], src_tgt[len(src_tgt) - room :]
                else:
                    src_ids, src_tgt = src_ids[:room], src_tgt[:room]
            room = max(cfg.max_length - len(prefix) - len(src_ids), 0)
            tgt_ids, tgt_tgt = tgt_ids[:room], tgt_tgt[:room]
        input_ids = prefix + src_ids + tgt_ids
        flags = [False] * len(prefix) + src_tgt + tgt_tgt
        if cfg.mask_input:
            labels = [t if f else IGNORE_INDEX for t, f in zip(input_ids, flags, strict=True)]
        elif cfg.mask_response:
            labels = [IGNORE_INDEX if f else t for t, f in zip(input_ids, flags, strict=True)]
        else:
            labels = list(input_ids)
        # Position 0 is never predicted, so a label there alone would give no loss.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            out.n_dropped += 1
            continue
        out.n_truncated += len(input_ids) < n_before
        out.examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
        out.kept.append(index)
    return out


def held_out_count(n: int, validation_split_percentage: float) -> int:
    """How many of ``n`` examples :func:`split_train_eval` holds out: none when the percentage is 0 or
    ``n < 2``, else the rounded percentage, at least one and never all."""
    if validation_split_percentage <= 0 or n < 2:
        return 0
    return min(max(1, round(n * validation_split_percentage / 100)), n - 1)


def split_train_eval(
    examples: Sequence[Any], validation_split_percentage: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """Deterministically hold out ``validation_split_percentage`` percent of ``examples``.

    Returns:
        ``(train, eval)``, each in original order. ``eval`` is empty when the percentage is 0 or there
        are fewer than two examples; otherwise it has at least one and ``train`` keeps at least one.
    """
    n = len(examples)
    n_eval = held_out_count(n, validation_split_percentage)
    if n_eval == 0:
        return list(examples), []
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    held = set(perm[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals
