"""Batching for padded training: length-grouped batch order and the padding :class:`Collator`.

The packed alternative (several examples per row) is :mod:`.packing`. torch is imported only when a
batch is collated, so computing batch orders stays cheap.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from .tokenization import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    import torch

    from sqft_service.config import DatasetSection

    from .images import ImageInputs


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Batches of indices for one epoch, grouped by length so little padding is needed.

    Like HF's ``LengthGroupedSampler``: shuffle, take mega-chunks of ``batch_size * 50`` indices,
    sort each by length (longest first) and cut it into batches, then shuffle the batch order. The
    batch holding the longest sequence goes first so an out-of-memory error shows at step 1, not
    hours in. Deterministic given ``(seed, epoch)``; the last batch may be short.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    # A string seed hashes deterministically across processes, and keeps (1, 0) apart from (0, 1).
    rng = random.Random(f"sqft-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class Collator:
    """Pads a list of :class:`TokenizedExample` to the batch's longest (never to a fixed length).

    The result holds tensors ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads), plus
    python ints ``n_real_tokens`` (attention-mask sum), ``n_label_tokens`` (labels that take a
    loss after the causal shift, ``labels[:, 1:] != -100``) and ``n_padded_tokens`` (the tensor
    size); pop the ints before calling the model. A batch with images (``images``: the model's
    :class:`~.images.ImageInputs`) also holds ``media``: the image inputs its model body takes
    (``pixel_values``, or the images' cached ``image_features``; and Gemma 3's ``token_type_ids``, 1 on
    image tokens).

    Args:
        pad_token_id: Id written into padded positions of ``input_ids``.
        padding_side: ``"right"`` or ``"left"``.
        pad_to_multiple_of: Round the padded length up to this (tensor-core friendly); ``None``
            pads to the longest exactly.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["left", "right"] = "right",
        pad_to_multiple_of: int | None = 8,
        images: ImageInputs | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.images = images

    @classmethod
    def from_config(
        cls, tokenizer: Any, cfg: DatasetSection, pad_to_multiple_of: int | None = 8, images: ImageInputs | None = None
    ) -> Collator:
        """A collator using the tokenizer's pad token (EOS when it has none) and ``cfg.padding_side``."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        return cls(pad, cfg.padding_side, pad_to_multiple_of, images)

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(ex.input_ids) for ex in examples)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for row, ex in enumerate(examples):
            k = len(ex.input_ids)
            sl = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
            input_ids[row, sl] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[row, sl] = torch.tensor(ex.labels, dtype=torch.long)
            # Nothing predicts a sequence's first token; with left padding the shifted loss would
            # otherwise score it from a pad position.
            labels[row, sl.start] = IGNORE_INDEX
            attention[row, sl] = 1
        batch: dict[str, torch.Tensor | int] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "n_real_tokens": int(attention.sum()),
            "n_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
            "n_padded_tokens": input_ids.numel(),
        }
        if any(ex.images for ex in examples):
            batch["media"] = self._media(examples, width)
        return batch

    def _media(self, examples: Sequence[TokenizedExample], width: int) -> dict[str, torch.Tensor]:
        import torch

        if self.images is None:
            raise ValueError("a batch with images needs the model's image inputs (Collator images=)")
        with_images = [ex for ex in examples if ex.images]
        if all(ex.image_features is not None for ex in with_images):  # computed once (training/image_features.py)
            # Token rows are the features' second-to-last dimension (Qwen3-VL's deepstack levels before it).
            media = {"image_features": torch.cat([ex.image_features for ex in with_images], dim=-2)}
            if self.images.features_as_list:
                media["image_features_as_list"] = True
            for key in with_images[0].image_layout or {}:  # Qwen2-VL's image_grid_thw: its rotary positions
                media[key] = torch.cat([ex.image_layout[key] for ex in with_images])
        else:
            media = self.images.model_inputs(examples)
        if self.images.token_types is not None:
            types = torch.zeros((len(examples), width), dtype=torch.long)
            for row, ex in enumerate(examples):
                if ex.image_tokens is not None:
                    k = len(ex.image_tokens)
                    sl = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
                    types[row, sl] = torch.tensor(ex.image_tokens, dtype=torch.long)
            media[self.images.token_types] = types
        return media
