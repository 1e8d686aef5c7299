"""Sequence packing: several examples per row, each attending only to itself.

A micro-batch's examples are laid end to end into as few rows as fit ``capacity`` tokens, balanced
so the rows end up about equally long (:func:`pack_rows`): little compute goes to padding.
Attention stays per example the way transformers does it for ``DataCollatorWithFlattening``:
``position_ids`` restart at 0 for every example and the 2-D ``attention_mask`` is left out, so the model's
``create_causal_mask`` finds the example boundaries in ``position_ids`` and builds a
block-diagonal causal mask. Padding at a row's end is its own segment (positions restart there
too) and carries no labels, so it never touches a real token. ``tests/unit/test_loss.py`` checks
that packed and unpacked batches give the same loss and gradients.

Packing pays when lengths vary inside a batch: with ``group_by_length`` off, SmolLM2 on ARC-E trains
1.17x faster packed than padded (bench, turn by turn). Length-grouped batches of short examples
waste only ~2% on padding and avoid the masked attention over long rows, so they stay the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tokenization import IGNORE_INDEX, TokenizedExample


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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows for :class:`PackingCollator`: as few as fit ``capacity``, then balanced.

    First-fit decreasing gives the fewest rows, but when the batch just overflows one row it leaves
    a short last row that still gets padded to the full width (548 tokens at capacity 512 become two
    512-wide rows). So the same number of rows is refilled longest-first into the emptiest row
    (LPT), and the layout with the narrower widest row is kept: the padded size is rows x widest.
    """
    bins = first_fit_decreasing(lengths, capacity)
    if len(bins) < 2:
        return bins
    rows: list[list[int]] = [[] for _ in bins]
    loads = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        emptiest = min(range(len(rows)), key=loads.__getitem__)
        rows[emptiest].append(i)
        loads[emptiest] += lengths[i]
    widest_bin = max(sum(lengths[i] for i in b) for b in bins)
    return rows if max(loads) < widest_bin else bins


class PackingCollator:
    """Packs a micro-batch into rows of at most ``capacity`` tokens (see the module docstring).

    Returns ``input_ids``, ``labels`` and ``position_ids`` tensors, ``attention_mask=None`` and the
    ints ``n_real_tokens``, ``n_label_tokens``, ``n_padded_tokens`` and ``n_rows``; with
    ``track_examples``, also ``example_ids``: each token's example (its index in the list given; -1 on
    padding), which preference training needs to sum log-probabilities per sequence.
    """

    def __init__(self, pad_token_id: int, capacity: int, *, track_examples: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"packing capacity must be positive, got {capacity}")
        self.pad_token_id = pad_token_id
        self.capacity = capacity
        self.track_examples = track_examples

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = pack_rows([len(ex.input_ids) for ex in examples], self.capacity)
        width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        example_ids = torch.full(shape, -1, dtype=torch.long) if self.track_examples else None
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
                if example_ids is not None:
                    example_ids[r, start : start + k] = i
                start += k
            position_ids[r, start:] = torch.arange(width - start)  # the tail pad is a segment of its own
            n_real += start
        batch = {
            "input_ids": input_ids,
            "attention_mask": None,
            "position_ids": position_ids,
            "labels": labels,
            "n_real_tokens": n_real,
            "n_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
            "n_padded_tokens": input_ids.numel(),
            "n_rows": len(rows),
        }
        if example_ids is not None:
            batch["example_ids"] = example_ids
        return batch


def separates_packed_examples(model: Any, n_tokens: int = 6) -> bool:
    """Whether ``model`` keeps packed examples apart (its attention mask reads ``position_ids``).

    Models built on transformers' ``create_causal_mask`` do; custom (remote-code) attention may not
    and would silently attend across examples. Two short random sequences are run packed in one row
    and as a padded batch; their hidden states must agree.
    """
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, n_tokens), generator=torch.Generator().manual_seed(0))
    decoder = model.get_decoder()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apart = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
            packed = decoder(
                input_ids=ids.reshape(1, -1),
                position_ids=torch.arange(n_tokens).repeat(2).unsqueeze(0),
                use_cache=False,
            ).last_hidden_state
    finally:
        model.train(was_training)
    return torch.allclose(packed.reshape(apart.shape), apart, rtol=1e-4, atol=1e-4)
