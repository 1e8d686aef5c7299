"""Sequence packing: bin filling, row balancing, and the packing collator's positions and labels."""

from __future__ import annotations

from sqft_service.training.packing import PackingCollator, first_fit_decreasing, pack_rows
from sqft_service.training.tokenization import TokenizedExample


def test_first_fit_decreasing_fills_bins_and_keeps_every_index_once():
    lengths = [5, 11, 17, 23, 3, 40]
    bins = first_fit_decreasing(lengths, capacity=25)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert bins[0] == [5]  # longer than the capacity: a bin of its own
    assert all(sum(lengths[i] for i in b) <= 25 for b in bins[1:])
    assert len(bins) == 4  # 40 | 23 | 17+5+3 | 11
    assert first_fit_decreasing([], 10) == []


def test_packing_collator_restarts_positions_and_masks_each_first_token():
    examples = [TokenizedExample([10, 11, 12], [10, 11, 12]), TokenizedExample([20, 21], [-100, 21])]
    batch = PackingCollator(pad_token_id=0, capacity=8)(examples)
    assert batch["attention_mask"] is None
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21]]
    assert (batch["n_real_tokens"], batch["n_label_tokens"], batch["n_padded_tokens"]) == (5, 3, 5)
    two_rows = PackingCollator(pad_token_id=0, capacity=3)(examples)
    assert two_rows["input_ids"].tolist() == [[10, 11, 12], [20, 21, 0]]
    assert two_rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # the pad is a segment of its own
    assert two_rows["labels"][1, 2] == -100 and two_rows["n_padded_tokens"] == 6


def test_pack_rows_balances_an_overflowing_batch():
    lengths = [200, 200, 100, 48]
    assert first_fit_decreasing(lengths, 512) == [[0, 1, 2], [3]]  # a 500-wide and a 48-long row
    rows = pack_rows(lengths, 512)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3] and len(rows) == 2
    assert max(sum(lengths[i] for i in r) for r in rows) == 300  # 200+100 | 200+48
    assert pack_rows([5, 11, 17, 23], 64) == [[3, 2, 1, 0]]  # one row: nothing to balance
