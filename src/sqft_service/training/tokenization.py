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
from .records import DataValidationError, record_images

if TYPE_CHECKING:
    from sqft_service.config import DatasetSection

    from .images import ImageInputs

# The label of a position that takes no loss (PyTorch's cross-entropy default ``ignore_index``).
# Defined only here so the collators, the loss and the tests cannot disagree on it.
IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training sequence; ``labels`` is ``IGNORE_INDEX`` (-100) where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    # A record with images (training/images.py): their ``image_url`` objects in order, the processor options
    # they are read with, a flag per token (1 where an image's features go), and the features once cached.
    images: tuple[dict[str, Any], ...] = ()
    image_options: dict[str, Any] = field(default_factory=dict)
    image_tokens: list[int] | None = None
    image_features: Any = None  # the images' features, once computed (training/image_features.py)
    image_layout: Any = None  # with them, the per-image inputs the model body still reads (image_grid_thw)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset:
    """What :func:`tokenize_records` returns: the kept examples plus what happened to the rest.

    Attributes:
        examples: The examples, in record order (dropped ones left out).
        n_dropped: Records dropped because no label survived truncation and masking.
        n_truncated: Kept examples that were shortened.
        n_images_cut: Records dropped because truncation would have cut into their images' tokens.
        kept: The index of each example's record in the records given.
    """

    examples: list[TokenizedExample] = field(default_factory=list)
    n_dropped: int = 0
    n_truncated: int = 0
    n_images_cut: int = 0
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
    segments = chat_segments(template_turns(record["messages"]), tokenizer, index, record.get("tools"))
    if last_turn_only:  # earlier assistant turns become context
        last = max(i for i, (_, target) in enumerate(segments) if target)
        segments = [(text, target and i == last) for i, (text, target) in enumerate(segments)]
    return segments, False


def template_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as templates take them: content given as text parts joined into a string, and a message
    with images as parts ``{"type": "text", "text"}`` and ``{"type": "image"}`` (the processor's placeholder)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if any(part["type"] == "image_url" for part in content):
                content = [
                    {"type": "image"} if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
                    for part in content
                ]
            else:
                content = "".join(part["text"] for part in content)
            m = {**m, "content": content}
        out.append(m)
    return out


def _tokenize_pieces(
    per_record: list[tuple[list[tuple[str, bool]], bool]],
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    images: ImageInputs | None,
) -> list[tuple[list[tuple[list[int], list[int] | None]], tuple[dict[str, Any], ...], dict[str, Any]]]:
    """Each record's pieces as ``(ids, image flags)`` (flags None: a piece without images), its images and
    the options they are read with: text pieces in one batched tokenizer call, a piece with images by the
    processor, which expands them."""
    plans = []  # per record: its images, their options, and each piece's images (none: the tokenizer's)
    for index, ((segs, _), record) in enumerate(zip(per_record, records, strict=True)):
        pictures = tuple(record_images(record))
        if not pictures:
            plans.append(((), {}, [()] * len(segs)))
            continue
        if images is None:
            raise DataValidationError(f"record {index} has images, and this model reads text only")
        shares, left = [], list(pictures)
        for text, _ in segs:
            n = text.count(images.placeholder)
            shares.append(tuple(left[:n]))
            left = left[n:]
        if left:
            raise DataValidationError(f"record {index}: the chat template placed fewer images than the record has")
        plans.append((pictures, images.options(pictures), shares))
    texts = [
        text
        for (segs, _), (_, _, shares) in zip(per_record, plans, strict=True)
        for (text, _), share in zip(segs, shares, strict=True)
        if not share
    ]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for (segs, _), (pictures, options, shares) in zip(per_record, plans, strict=True):
        pieces: list[tuple[list[int], list[int] | None]] = [
            images.encode(text, share, options) if share else (next(text_ids), None)  # type: ignore[union-attr]
            for (text, _), share in zip(segs, shares, strict=True)
        ]
        out.append((pieces, pictures, options))
    return out


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    cfg: DatasetSection,
    *,
    last_turn_only: bool = False,
    images: ImageInputs | None = None,
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
    reply); otherwise every assistant turn is. ``images``: an image-text model's processor, for records
    with images (``training/images.py``); their image tokens take no loss, and a record whose images
    truncation would cut into is dropped (counted in ``n_images_cut``) rather than trained half-seen.

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
    tokenized = _tokenize_pieces(per_record, records, tokenizer, images)

    out = TokenizedDataset()
    for index, ((segs, add_eos), (pieces, pictures, options)) in enumerate(zip(per_record, tokenized, strict=True)):
        ids: list[int] = []
        target: list[bool] = []
        kinds: list[int] = []  # 1: an image token
        last_target_start = 0
        for (_text, is_target), (piece, piece_kinds) in zip(segs, pieces, strict=True):
            if is_target:
                last_target_start = len(ids)
                if add_eos and eos_id is not None:
                    piece = [*piece, eos_id]
            ids.extend(piece)
            target.extend([is_target] * len(piece))
            kinds.extend(piece_kinds or [0] * len(piece))
        # Chat templates render their own BOS; Alpaca text gets it only if the tokenizer adds one.
        prefix: list[int] = bos if add_eos else []
        src, tgt = slice(0, last_target_start), slice(last_target_start, len(ids))
        src_ids, src_tgt, src_kinds = ids[src], target[src], kinds[src]
        tgt_ids, tgt_tgt, tgt_kinds = ids[tgt], target[tgt], kinds[tgt]
        n_before = len(prefix) + len(ids)
        if cfg.truncation:
            room = max(cfg.max_source_length - len(prefix), 0)
            if len(src_ids) > room:
                keep = slice(len(src_ids) - room, None) if cfg.truncation_side == "left" else slice(0, room)
                src_ids, src_tgt, src_kinds = src_ids[keep], src_tgt[keep], src_kinds[keep]
            room = max(cfg.max_length - len(prefix) - len(src_ids), 0)
            tgt_ids, tgt_tgt, tgt_kinds = tgt_ids[:room], tgt_tgt[:room], tgt_kinds[:room]
        input_ids = prefix + src_ids + tgt_ids
        flags = [False] * len(prefix) + src_tgt + tgt_tgt
        image_tokens = [0] * len(prefix) + src_kinds + tgt_kinds
        if sum(image_tokens) != sum(kinds):  # an image's features need every one of its tokens
            out.n_dropped += 1
            out.n_images_cut += 1
            continue
        if cfg.mask_input:
            labels = [t if f else IGNORE_INDEX for t, f in zip(input_ids, flags, strict=True)]
        elif cfg.mask_response:
            labels = [IGNORE_INDEX if f else t for t, f in zip(input_ids, flags, strict=True)]
        else:
            labels = list(input_ids)
        if any(image_tokens):  # an image's tokens stand for its features: nothing to predict there
            labels = [IGNORE_INDEX if k else t for t, k in zip(labels, image_tokens, strict=True)]
        # Position 0 is never predicted, so a label there alone would give no loss.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            out.n_dropped += 1
            continue
        out.n_truncated += len(input_ids) < n_before
        example = TokenizedExample(input_ids=input_ids, labels=labels)
        if any(image_tokens):
            example.images, example.image_options, example.image_tokens = pictures, options, image_tokens
        out.examples.append(example)
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
