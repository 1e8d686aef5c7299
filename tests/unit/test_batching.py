"""Batching: length-grouped batch order and the padding collator."""

from __future__ import annotations

import random

import pytest
import torch

from sqft_service.config import DatasetSection
from sqft_service.training.batching import Collator, length_grouped_batches
from sqft_service.training.tokenization import TokenizedExample, tokenize_records
from tests.helpers import CHAT, NO_INPUT, WITH_INPUT


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of padded positions if each batch is padded to its longest sequence."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded


def _varied_lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 30), rng.randint(100, 500)]) for _ in range(n)]


@pytest.mark.parametrize("group", [True, False])
def test_batches_cover_every_index_once_and_are_deterministic(group):
    lengths = _varied_lengths(1003)
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert length_grouped_batches(lengths, 8, seed=3, epoch=0, group_by_length=group) == batches
    assert length_grouped_batches(lengths, 8, seed=3, epoch=1, group_by_length=group) != batches
    assert length_grouped_batches(lengths, 8, seed=4, epoch=0, group_by_length=group) != batches


def test_length_grouping_reduces_padding_and_puts_the_longest_first():
    lengths = _varied_lengths()
    grouped = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    plain = length_grouped_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    assert padding_waste(grouped, lengths) < 0.5 * padding_waste(plain, lengths)
    assert padding_waste(grouped, lengths) < 0.1
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    # Batch order is still shuffled, not sorted by length.
    maxima = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_batches_of_empty_input():
    assert length_grouped_batches([], 4, seed=0, epoch=0) == []


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------

EXAMPLES = [
    TokenizedExample(input_ids=[5, 6, 7], labels=[-100, 6, 7]),
    TokenizedExample(input_ids=list(range(10, 21)), labels=[-100] * 5 + list(range(15, 21))),
]


def test_collator_right_padding_to_multiple_of_8():
    batch = Collator(pad_token_id=2)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [2] * 13
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["labels"][1, :11].tolist() == EXAMPLES[1].labels
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["n_real_tokens"] == 14
    assert batch["n_label_tokens"] == 2 + 6
    assert isinstance(batch["n_real_tokens"], int) and isinstance(batch["n_label_tokens"], int)


def test_collator_left_padding_and_no_multiple():
    batch = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=None)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 11)
    assert batch["input_ids"][0].tolist() == [0] * 8 + [5, 6, 7]
    assert batch["attention_mask"][0].tolist() == [0] * 8 + [1] * 3
    assert batch["labels"][0].tolist() == [-100] * 8 + [-100, 6, 7]
    assert batch["input_ids"][1].tolist() == EXAMPLES[1].input_ids


def test_collator_never_trains_a_first_token_from_padding():
    ex = TokenizedExample(input_ids=[5, 6], labels=[5, 6])  # no masking: first token labelled
    batch = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=None)([ex, EXAMPLES[1]])
    assert batch["labels"][0].tolist() == [-100] * 9 + [-100, 6]
    assert batch["n_label_tokens"] == 1 + 6


def test_collator_from_config_on_real_data(tokenizer):
    data = tokenize_records([WITH_INPUT, NO_INPUT, CHAT], tokenizer, DatasetSection())
    collate = Collator.from_config(tokenizer, DatasetSection(padding_side="left"))
    batch = collate(list(data))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] - max(data.lengths) < 8
    assert batch["n_real_tokens"] == sum(data.lengths)
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
