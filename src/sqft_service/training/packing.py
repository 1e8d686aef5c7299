"""Sequence packing: several examples per row, each attending only to itself.

A micro-batch's examples are laid end to end into as few rows as fit ``capacity`` tokens
(first-fit decreasing), so no compute goes to padding beyond the last row's tail. Attention stays
per example the way transformers does it for ``DataCollatorWithFlattening``: ``position_ids``
restart at 0 for every example and the 2-D ``attention_mask`` is left out, so the model's
``create_causal_mask`` finds the example boundaries in ``position_ids`` and builds a
block-diagonal causal mask. Padding at a row's end is its own segment (positions restart there
too) and carries no labels, so it never touches a real token. ``tests/unit/test_loss.py`` checks
that packed and unpacked batches give the same loss and gradients.

Packing pays when lengths vary inside a batch: with ``group_by_length`` off, SmolLM2 on ARC-E trains
1.3x faster packed than padded. Length-grouped batches of short examples waste only ~2% on padding
and avoid the masked attention over long rows, so they stay the default (see the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data import IGNORE_INDEX, TokenizedExample


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` (a longer item gets its own bin).

    Deterministic: ties keep their input order, and bins keep the order items were placed.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


class PackingCollator:
    """Packs a micro-batch into rows of at most ``capacity`` tokens (see the module docstring).

    Returns ``input_ids``, ``labels`` and ``position_ids`` tensors, ``attention_mask=None`` and the
    ints ``n_real_tokens``, ``n_label_tokens``, ``n_padded_tokens`` and ``n_rows``.
    """

    def __init__(self, pad_token_id: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"packing capacity must be positive, got {capacity}")
        self.pad_token_id = pad_token_id
        self.capacity = capacity

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = first_fit_decreasing([len(ex.input_ids) for ex in examples], self.capacity)
        width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        n_real = 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ex = examples[i]
                k = len(ex.input_ids)
                input_ids[r, start : start + k] = torch.tensor(ex.input_ids, dtype=torch.long)
                labels[r, start : start + k] = torch.tensor(ex.labels, dtype=torch.long)
                # Nothing predicts an example's first token: the token before it belongs to another example.
                labels[r, start] = IGNORE_INDEX
                position_ids[r, start : start + k] = torch.arange(k)
                start += k
            position_ids[r, start:] = torch.arange(width - start)  # the tail pad is a segment of its own
            n_real += start
        return {
            "input_ids": input_ids,
            "attention_mask": None,
            "position_ids": position_ids,
            "labels": labels,
            "n_real_tokens": n_real,
            "n_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
            "n_padded_tokens": input_ids.numel(),
            "n_rows": len(rows),
        }
