"""Training files: JSON and JSONL loading, format detection, and validation errors that name the line."""

from __future__ import annotations

import json

import pytest

from sqft_service.errors import UserError
from sqft_service.training.records import DataValidationError, inspect_training_file, load_records
from tests.helpers import CHAT, NO_INPUT, WITH_INPUT, write_jsonl


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
        _lines(_chat, json.dumps({"messages": [{"role": "system", "content": "hi"}]})),
        2,
        "no assistant message",
    ),
    "last not assistant": (
        _lines(json.dumps({"messages": [*CHAT["messages"], {"role": "system", "content": "?"}]})),
        1,
        "last message must be from the assistant",
    ),
    "a prompt among chat records": (
        _lines(_chat, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
        2,
        "prompt format but earlier records are in chat format",
    ),
    "a prompt with a tool message": (
        _lines(json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "?"}]})),
        1,
        "messages[0].role must be one of system, developer, user, assistant",
    ),
    "empty messages": (_lines(_chat, _chat, '{"messages": []}'), 3, "non-empty array"),
    "bad role": (
        _lines(json.dumps({"messages": [{"role": "bot", "content": "x"}]})),
        1,
        "role must be one of",
    ),
    "content not string": (
        _lines(json.dumps({"messages": [{"role": "assistant", "content": 5}]})),
        1,
        "content must be a string, got number",
    ),
    "content part not object": (
        _lines(json.dumps({"messages": [{"role": "assistant", "content": ["x"]}]})),
        1,
        "content[0] must be a content part (an object with 'type'), got string",
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


def test_validation_error_is_a_user_error_about_the_training_file():
    err = DataValidationError("field 'output' must be a string, got number", 3)
    assert isinstance(err, UserError)
    assert str(err) == err.message == "line 3: field 'output' must be a string, got number"
    assert err.line == 3
    assert err.to_error() == {"code": "invalid_training_file", "message": str(err), "param": "training_file"}
    other = DataValidationError("file is empty", param="validation_file", code="empty_file")
    assert (other.line, other.param, other.code, str(other)) == (None, "validation_file", "empty_file", "file is empty")


def test_prompt_records_are_their_own_format_with_any_other_fields(tmp_path):
    """OpenAI's reinforcement records: messages ending in the user's (or developer's) turn, plus the
    fields a grader reads."""
    records = [
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4},
        {"messages": [{"role": "user", "content": "Say hi"}], "reference_answer": "hi", "tags": ["x"]},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yes?"},
                {"role": "developer", "content": "Go"},
            ]
        },
    ]
    path = tmp_path / "rft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    stats = inspect_training_file(path)
    assert (stats.format, stats.n_records) == ("prompt", 3)
    assert load_records(path) == records
