"""Tokenization: Alpaca and chat prompts, loss masking, truncation, and the train/eval split."""

from __future__ import annotations

import random

import pytest

from sqft_service.config import DatasetSection
from sqft_service.training.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from sqft_service.training.records import DataValidationError
from sqft_service.training.tokenization import IGNORE_INDEX, TokenizedExample, split_train_eval, tokenize_records
from tests.helpers import CHAT, NO_INPUT, WITH_INPUT


def cfg(**kw) -> DatasetSection:
    return DatasetSection(**kw)


def split_parts(tokenizer, ex: TokenizedExample) -> tuple[str, str]:
    """Decode the masked and the trained tokens separately."""
    masked = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    trained = [lab for lab in ex.labels if lab != IGNORE_INDEX]
    return tokenizer.decode(masked), tokenizer.decode(trained)


# --------------------------------------------------------------------------------------------------
# Alpaca prompts and masking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT, {**NO_INPUT, "input": ""}], ids=["input", "none", "empty"])
def test_alpaca_prompt_is_canonical_and_target_is_output_plus_eos(tokenizer, record):
    (ex,) = tokenize_records([record], tokenizer, cfg())
    prompt, target = split_parts(tokenizer, ex)
    if record.get("input"):
        expected = (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n### Response:\n"
        )
        assert expected == PROMPT_WITH_INPUT.format(**record)
    else:
        expected = (
            "Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{record['instruction']}\n\n### Response:\n"
        )
        assert expected == PROMPT_NO_INPUT.format(instruction=record["instruction"])
    assert prompt == expected
    assert target == record["output"] + tokenizer.eos_token
    # The prompt is one masked prefix, the target one trained suffix ending in EOS.
    n_prompt = ex.labels.count(IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    # SmolLM2 adds no BOS of its own, so none is prepended.
    assert ex.input_ids[0] != tokenizer.bos_token_id


def test_mask_input_masks_exactly_the_prompt_tokens(tokenizer):
    (ex,) = tokenize_records([WITH_INPUT], tokenizer, cfg())
    n_prompt = len(tokenizer(PROMPT_WITH_INPUT.format(**WITH_INPUT), add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in ex.labels[n_prompt:]


def test_mask_response_trains_only_the_prompt(tokenizer):
    (masked_in,) = tokenize_records([WITH_INPUT], tokenizer, cfg())
    (ex,) = tokenize_records([WITH_INPUT], tokenizer, cfg(mask_input=False, mask_response=True))
    assert ex.input_ids == masked_in.input_ids
    prompt_tokens, trained = split_parts(tokenizer, ex)
    assert trained == PROMPT_WITH_INPUT.format(**WITH_INPUT)
    assert prompt_tokens == WITH_INPUT["output"] + tokenizer.eos_token


def test_no_masking_trains_everything(tokenizer):
    (ex,) = tokenize_records([WITH_INPUT], tokenizer, cfg(mask_input=False))
    assert ex.labels == ex.input_ids


def test_truncation_to_max_length_cuts_the_response_on_the_right(tokenizer):
    record = {"instruction": "Count.", "output": " ".join(str(i) for i in range(200))}
    n_prompt = len(tokenizer(PROMPT_NO_INPUT.format(instruction="Count."))["input_ids"])
    full = tokenize_records([record], tokenizer, cfg(max_length=4096, max_source_length=4096))
    short = tokenize_records([record], tokenizer, cfg(max_length=n_prompt + 10, max_source_length=n_prompt))
    assert len(short[0]) == n_prompt + 10
    assert short.n_truncated == 1 and full.n_truncated == 0
    assert short[0].input_ids == full[0].input_ids[: n_prompt + 10]
    assert len(short[0].labels) == len(short[0].input_ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_max_source_length_truncates_the_prompt_from_the_configured_side(tokenizer, side):
    record = {"instruction": "word " * 100, "output": "Done."}
    prompt_ids = tokenizer(PROMPT_NO_INPUT.format(instruction=record["instruction"]))["input_ids"]
    target_ids = [*tokenizer("Done.")["input_ids"], tokenizer.eos_token_id]
    (ex,) = tokenize_records([record], tokenizer, cfg(max_source_length=20, truncation_side=side))
    kept = prompt_ids[-20:] if side == "left" else prompt_ids[:20]
    assert ex.input_ids == kept + target_ids
    assert ex.labels == [IGNORE_INDEX] * 20 + target_ids
    if side == "left":
        assert tokenizer.decode(ex.input_ids[:20]).endswith("### Response:\n")


def test_truncation_off_keeps_everything(tokenizer):
    record = {"instruction": "word " * 100, "output": "x " * 100}
    (ex,) = tokenize_records([record], tokenizer, cfg(max_length=16, max_source_length=8, truncation=False))
    assert len(ex) > 200


def test_examples_without_labels_are_dropped(tokenizer):
    long_prompt = {"instruction": "word " * 100, "output": "kept?"}
    data = tokenize_records([NO_INPUT, long_prompt, WITH_INPUT], tokenizer, cfg(max_length=80, max_source_length=80))
    assert data.n_dropped == 1
    assert len(data) == 2
    assert data.lengths == [len(ex) for ex in data]
    assert all(any(lab != IGNORE_INDEX for lab in ex.labels[1:]) for ex in data)


def test_batched_tokenization_matches_per_record(tokenizer):
    rng = random.Random(0)
    records = [
        {"instruction": f"Task {i}: " + "abc " * rng.randint(0, 30), "output": "out " * rng.randint(1, 20)}
        for i in range(50)
    ]
    together = tokenize_records(records, tokenizer, cfg(max_length=64, max_source_length=48))
    one_by_one = [tokenize_records([r], tokenizer, cfg(max_length=64, max_source_length=48))[0] for r in records]
    assert [ex.input_ids for ex in together] == [ex.input_ids for ex in one_by_one]
    assert [ex.labels for ex in together] == [ex.labels for ex in one_by_one]


# --------------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------------


def test_chat_trains_only_assistant_content_and_end_token(tokenizer):
    (ex,) = tokenize_records([CHAT], tokenizer, cfg())
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == rendered
    eos = tokenizer.eos_token
    # Collect runs of trained tokens: one per assistant turn.
    runs, current = [], []
    for lab in ex.labels:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        runs.append(current)
    assert [tokenizer.decode(r) for r in runs] == ["It is 4." + eos, "That makes 6." + eos]
    _, trained = split_parts(tokenizer, ex)
    assert "user" not in trained and "assistant" not in trained and "briefly" not in trained


def test_chat_without_system_message_masks_the_default_system_prompt(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    (ex,) = tokenize_records([record], tokenizer, cfg())
    masked, trained = split_parts(tokenizer, ex)
    assert trained == "Hello!" + tokenizer.eos_token
    assert masked.startswith("<|im_start|>system\n")


def test_chat_mask_response_trains_everything_but_the_assistant(tokenizer):
    (ex,) = tokenize_records([CHAT], tokenizer, cfg(mask_input=False, mask_response=True))
    masked, trained = split_parts(tokenizer, ex)
    assert masked == "It is 4." + tokenizer.eos_token + "That makes 6." + tokenizer.eos_token
    assert "What is 2+2?" in trained


def test_chat_needs_a_chat_template(tokenizer):
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(DataValidationError, match="no chat template"):
            tokenize_records([CHAT], tokenizer, cfg())
        # Alpaca records don't need one.
        assert len(tokenize_records([NO_INPUT], tokenizer, cfg())) == 1
    finally:
        tokenizer.chat_template = saved


# --------------------------------------------------------------------------------------------------
# Train/eval split
# --------------------------------------------------------------------------------------------------


def test_split_train_eval():
    items = list(range(100))
    train, evals = split_train_eval(items, 10, seed=1)
    assert len(evals) == 10 and len(train) == 90
    assert sorted(train + evals) == items
    assert split_train_eval(items, 10, seed=1) == (train, evals)
    assert split_train_eval(items, 10, seed=2)[1] != evals
    assert split_train_eval(items, 0, seed=1) == (items, [])
    assert len(split_train_eval([1, 2], 1, seed=0)[1]) == 1
    assert split_train_eval([1], 50, seed=0) == ([1], [])
    assert len(split_train_eval([1, 2, 3], 99, seed=0)[0]) == 1
