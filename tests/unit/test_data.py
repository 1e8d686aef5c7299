"""Instruction data: validation with line numbers, Alpaca/chat prompts, masking, truncation, batching."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sqft_service.config import DatasetSection
from sqft_service.training.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    Collator,
    DataValidationError,
    TokenizedExample,
    inspect_training_file,
    length_grouped_batches,
    load_records,
    padding_waste,
    split_train_eval,
    tokenize_records,
)
from sqft_service.training.packing import PackingCollator, first_fit_decreasing, pack_rows

WITH_INPUT = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
NO_INPUT = {"instruction": "Name a primary colour.", "output": "Red is a primary colour."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "That makes 6."},
    ]
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(**kw) -> DatasetSection:
    return DatasetSection(**kw)


def split_parts(tokenizer, ex: TokenizedExample) -> tuple[str, str]:
    """Decode the masked and the trained tokens separately."""
    masked = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    trained = [lab for lab in ex.labels if lab != IGNORE_INDEX]
    return tokenizer.decode(masked), tokenizer.decode(trained)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_jsonl_and_json_array_load_the_same_records(tmp_path):
    records = [WITH_INPUT, NO_INPUT, {**NO_INPUT, "input": ""}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")

    assert load_records(jsonl) == records
    assert load_records(array) == records
    stats = inspect_training_file(jsonl)
    assert (stats.format, stats.n_records, stats.n_lines) == ("alpaca", 3, 3)
    assert inspect_training_file(array).n_records == 3


def test_chat_file_is_detected_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    stats = inspect_training_file(path)
    assert (stats.format, stats.n_records) == ("chat", 2)


def test_max_bytes_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [WITH_INPUT] * 10)
    with pytest.raises(DataValidationError, match="over the limit"):
        inspect_training_file(path, max_bytes=50)
    assert inspect_training_file(path, max_bytes=10_000).n_records == 10


def _lines(*lines) -> bytes:
    return "\n".join(lines).encode() + b"\n"


_ok = json.dumps(NO_INPUT)
_chat = json.dumps(CHAT)
BAD_FILES = {
    "empty": (b"", None, "file is empty"),
    "whitespace only": (b"  \n\n", None, "file is empty"),
    "binary on line 3": (_lines(_ok, _ok) + b"\x00\x01\x02binary\n", 3, "not valid UTF-8 text"),
    "latin-1 on line 3": (_lines(_ok, _ok) + b'{"instruction": "caf\xe9"}\n', 3, "not valid UTF-8 text"),
    "invalid json line 2": (_lines(_ok, '{"instruction": "x" "output": "y"}', _ok), 2, "invalid JSON"),
    "missing output line 4": (
        _lines(_ok, _ok, _ok, '{"instruction": "no answer"}'),
        4,
        "record is missing required field 'output'",
    ),
    "output is a number": (_lines(_ok, '{"instruction": "x", "output": 42}'), 2, "'output' must be a string"),
    "input is null": (_lines('{"instruction": "x", "input": null, "output": "y"}'), 1, "'input' must be"),
    "not an object": (_lines(_ok, "[1, 2]"), 2, "expected a JSON object"),
    "neither format": (_lines(_ok, '{"prompt": "x", "completion": "y"}'), 2, "neither"),
    "no assistant": (
        _lines(_chat, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
        2,
        "no assistant message",
    ),
    "last not assistant": (
        _lines(json.dumps({"messages": [*CHAT["messages"], {"role": "user", "content": "?"}]})),
        1,
        "last message must be from the assistant",
    ),
    "empty messages": (_lines(_chat, _chat, '{"messages": []}'), 3, "non-empty array"),
    "bad role": (
        _lines(json.dumps({"messages": [{"role": "bot", "content": "x"}]})),
        1,
        "role must be one of",
    ),
    "content not string": (
        _lines(json.dumps({"messages": [{"role": "assistant", "content": ["x"]}]})),
        1,
        "content must be a string, got array",
    ),
    "mixed formats": (_lines(_ok, _ok, _chat), 3, "chat format but earlier records are in alpaca"),
    "mixed formats chat first": (_lines(_chat, _ok), 2, "alpaca format but earlier records are in chat"),
}


@pytest.mark.parametrize(("content", "line", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_name_the_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    for check in (inspect_training_file, load_records):
        with pytest.raises(DataValidationError) as info:
            check(path)
        assert info.value.line == line
        assert message in str(info.value)
        if line is not None:
            assert str(info.value).startswith(f"line {line}: ")


def test_invalid_json_message_has_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_lines(_ok, '{"instruction": "x" "output": "y"}'))
    with pytest.raises(DataValidationError, match=r"^line 2: invalid JSON \(Expecting ',' delimiter at column 21\)"):
        inspect_training_file(path)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', 3, "'output'"),
        ('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n "output": 1}\n]', 4, "string"),
        ('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]', 3, "expected ','"),
        ('[\n  {"instruction": "a",\n   "output": "b}\n]', 3, "invalid JSON"),
        ('[\n  {"instruction": "a", "output": "b"}\n]\n{}', 4, "extra data"),
    ],
)
def test_json_array_errors_name_the_record_line(tmp_path, text, line, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        inspect_training_file(path)
    assert info.value.line == line
    assert message in str(info.value)


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
# Splitting and batching
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
    data = tokenize_records([WITH_INPUT, NO_INPUT, CHAT], tokenizer, cfg())
    collate = Collator.from_config(tokenizer, cfg(padding_side="left"))
    batch = collate(list(data))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] - max(data.lengths) < 8
    assert batch["n_real_tokens"] == sum(data.lengths)
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


# --------------------------------------------------------------------------- packing
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
