"""Training files: the four record formats, JSON/JSONL parsing and validation.

Four record formats are accepted, one per file:

* **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``.
* **Chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; the
  last message must be the assistant's. With function calling (OpenAI's fine-tuning form): ``"tools"``
  beside ``"messages"``, assistant messages with ``"tool_calls"`` (content then optional) and ``"tool"``
  messages answering them (``"tool_call_id"``); rendered as ``tool_calls.py`` renders them when serving.
  An assistant message with ``"weight": 0`` (OpenAI's) stays context: it is not trained on.
  Content may be an array of parts (OpenAI's vision fine-tuning form): ``{"type": "text", "text"}``, and
  in user messages ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,...", "detail"}}``
  for image-text models (``training/images.py``); images come as ``data:`` URLs (the service fetches
  nothing), read here as serving reads them (``inference/images.py``), up to ``MAX_IMAGES`` a record.
* **Preference** (for ``method.type: "dpo"``), in OpenAI's form ``{"input": {"messages": [...]},
  "preferred_output": [{"role": "assistant", "content": str}], "non_preferred_output": [...]}`` or in
  TRL's (Hugging Face preference data sets) ``{"prompt": str | messages, "chosen": str | messages,
  "rejected": str | messages}``; the prompt's last message is not the assistant's, and each reply is
  one assistant message (a string is one). :func:`as_openai_preference` turns either into OpenAI's.
* **Prompt** (for ``method.type: "reinforcement"``, OpenAI's reinforcement fine-tuning form):
  ``{"messages": [...], ...}`` whose last message is the user's (or the developer's): the prompt the
  model answers while it trains; the record, with any other fields, is the grader's ``item``
  (``{{ item.reference_answer }}``). Roles ``system``, ``developer``, ``user``, ``assistant``.

A file is either a JSON array of records or JSONL (one object per non-blank line). Validation errors
name the 1-based line on which the offending record starts, so an upload can be fixed without
guessing. The API validates uploads with this module, so it must not import torch or transformers
(directly or through a package ``__init__``), FastAPI or the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..inference.images import MAX_IMAGES, read_image

Format = Literal["alpaca", "chat", "preference", "prompt"]
_ROLES = ("system", "user", "assistant", "tool")
_PROMPT_ROLES = ("system", "user", "assistant")  # TRL preference prompts and replies: no tools
# A reinforcement prompt's roles ("developer" is OpenAI's newer name for the system role) and its last.
_RL_ROLES = ("system", "developer", "user", "assistant")
_RL_LAST = ("user", "developer")


# The record formats each training method takes, and how an error names them.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "supervised": ("alpaca", "chat"),
    "dpo": ("preference",),
    "reinforcement": ("prompt", "alpaca"),
}
METHOD_RECORDS = {
    "supervised": "Alpaca or chat records",
    "dpo": "preference records (input/preferred_output/non_preferred_output or prompt/chosen/rejected)",
    "reinforcement": "prompt records (messages ending in the user's turn, plus the fields its grader reads) "
    "or Alpaca records",
}


def wrong_format(method: str, fmt: str) -> str | None:
    """Why a ``method`` job can't train on ``fmt`` records (None: it can)."""
    if fmt in METHOD_FORMATS[method]:
        return None
    hint = next((m for m, formats in METHOD_FORMATS.items() if fmt in formats and m != "supervised"), None)
    told = f"; train on them with `method.type` '{hint}'" if hint else ""
    return f"holds {fmt} records; a {method} job needs {METHOD_RECORDS[method]}{told}"


class DataValidationError(UserError):
    """A training file or record is unusable; the message names the line (1-based) or record.

    Attributes:
        line: The 1-based line the problem is on, or ``None`` when it is not tied to a line.
    """

    code = "invalid_training_file"
    param = "training_file"

    def __init__(
        self, message: str, line: int | None = None, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message, param=param, code=code)
        self.line = line


@dataclass(frozen=True)
class FileStats:
    """What :func:`inspect_training_file` learned about a file."""

    format: Format
    n_records: int
    n_lines: int
    n_images: int = 0  # image parts in chat records (for image-text models)
    max_images: int = 0  # the most images one record holds


def json_type(value: Any) -> str:
    """A JSON value's type as JSON names it (for messages: 'got number')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_OPENAI_PAIR = ("preferred_output", "non_preferred_output")
_TRL_PAIR = ("chosen", "rejected")


def is_preference_record(rec: dict[str, Any]) -> bool:
    return any(key in rec for key in (*_OPENAI_PAIR, *_TRL_PAIR))


def as_openai_preference(rec: dict[str, Any]) -> dict[str, Any]:
    """A validated preference record in OpenAI's form (a TRL record converted, an OpenAI one as it is)."""
    if "input" in rec or not any(key in rec for key in _TRL_PAIR):
        return rec

    def turns(value: Any, role: str) -> list[dict[str, Any]]:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return {
        "input": {"messages": turns(rec["prompt"], "user")},
        "preferred_output": turns(rec["chosen"], "assistant"),
        "non_preferred_output": turns(rec["rejected"], "assistant"),
    }


def is_prompt_record(rec: dict[str, Any]) -> bool:
    """A chat record that ends in the user's (or developer's) turn: a reinforcement prompt."""
    messages = rec.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    return isinstance(last, dict) and last.get("role") in _RL_LAST


def record_format(rec: dict[str, Any], line: int) -> Format:
    """The format of one record (an object); a DataValidationError naming ``line`` for none."""
    if is_preference_record(rec):
        return "preference"
    if is_prompt_record(rec):
        return "prompt"
    if "messages" in rec:
        return "chat"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise DataValidationError(
        "record has neither 'instruction'/'output' (Alpaca format), 'messages' (chat format) nor "
        "'preferred_output'/'non_preferred_output' or 'chosen'/'rejected' (preference format)",
        line,
    )


def _require_str(rec: dict[str, Any], key: str, line: int, *, required: bool) -> None:
    if key not in rec:
        if required:
            raise DataValidationError(f"record is missing required field '{key}'", line)
        return
    if not isinstance(rec[key], str):
        raise DataValidationError(f"field '{key}' must be a string, got {json_type(rec[key])}", line)


def _validate_record(rec: Any, line: int, expected: Format | None) -> Format:
    """Check one record; returns its format. ``expected`` is the format of the file's first record."""
    if not isinstance(rec, dict):
        raise DataValidationError(f"expected a JSON object, got {json_type(rec)}", line)
    fmt = record_format(rec, line)
    if expected is not None and fmt != expected:
        raise DataValidationError(
            f"record is in {fmt} format but earlier records are in {expected} format (a file must use one format)",
            line,
        )
    if fmt == "alpaca":
        _require_str(rec, "instruction", line, required=True)
        _require_str(rec, "output", line, required=True)
        _require_str(rec, "input", line, required=False)
        return fmt
    if fmt == "preference":
        _validate_preference(rec, line)
        return fmt
    if fmt == "prompt":
        _validate_messages(rec["messages"], "messages", line, roles=_RL_ROLES)
        return fmt
    messages = rec["messages"]
    _validate_messages(messages, "messages", line, tools=True, weights=True, parts=True)
    _validate_tools(rec, messages, line)
    if len(record_images(rec)) > MAX_IMAGES:
        raise DataValidationError(f"record has {len(record_images(rec))} images, over the limit of {MAX_IMAGES}", line)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise DataValidationError("'messages' has no assistant message (of weight 1): nothing to train on", line)
    if messages[-1]["role"] != "assistant":
        raise DataValidationError("the last message must be from the assistant", line)
    return fmt


def _validate_messages(
    messages: Any,
    where: str,
    line: int,
    *,
    tools: bool = False,
    weights: bool = False,
    roles: tuple[str, ...] | None = None,
    parts: bool = False,
) -> None:
    """Each message's role (one of ``roles``, by default those of ``tools``) and content; with ``tools``,
    tool calls and tool messages too; with ``weights`` (a chat record's), an assistant message's ``weight``;
    with ``parts`` (a chat record's), content as an array of text and (user messages) image parts."""
    if not isinstance(messages, list) or not messages:
        raise DataValidationError(f"field '{where}' must be a non-empty array", line)
    roles = roles or (_ROLES if tools else _PROMPT_ROLES)
    for j, msg in enumerate(messages):
        at = f"{where}[{j}]"
        if not isinstance(msg, dict):
            raise DataValidationError(f"{at} must be an object, got {json_type(msg)}", line)
        role = msg.get("role")
        if role not in roles:
            raise DataValidationError(f"{at}.role must be one of {', '.join(roles)}, got {role!r}", line)
        calls = msg.get("tool_calls") if tools else None
        if calls is not None:
            _validate_calls(calls, f"{at}.tool_calls", role, line)
        content = msg.get("content")
        if isinstance(content, list) and parts:
            _validate_parts(content, f"{at}.content", role, line)
        elif isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            raise DataValidationError(
                f"{at}.content: images are taken in chat records (supervised fine-tuning) only", line
            )
        elif not isinstance(content, str) and not (calls and content is None):
            got = json_type(content) if "content" in msg else "nothing"
            raise DataValidationError(f"{at}.content must be a string, got {got}", line)
        if "weight" in msg and (
            not weights or role != "assistant" or msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool)
        ):
            raise DataValidationError(f"{at}.weight: only an assistant message of a chat record has one, 0 or 1", line)
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise DataValidationError(f"{at}.tool_call_id must be a string (the id of the call it answers)", line)


def _validate_parts(content: list[Any], at: str, role: str, line: int) -> None:
    """Content parts: text, and images in a user message (their headers read, as serving reads them)."""
    if not content:
        raise DataValidationError(f"{at} must be a string or a non-empty array of parts", line)
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            raise DataValidationError(
                f"{at}[{k}] must be a content part (an object with 'type'), got {json_type(part)}", line
            )
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise DataValidationError(f"{at}[{k}]: a text part is {{'type': 'text', 'text': str}}", line)
        elif kind == "image_url":
            if role != "user":
                raise DataValidationError(f"{at}[{k}]: images are taken in user messages, not {role} ones", line)
            image = part.get("image_url")
            if (
                not isinstance(image, dict)
                or not isinstance(image.get("url"), str)
                or set(image) - {"url", "detail"}
                or set(part) - {"type", "image_url"}
            ):
                raise DataValidationError(
                    f"{at}[{k}]: an image part is {{'type': 'image_url', 'image_url': {{'url': str, 'detail'?}}}}", line
                )
            if image.get("detail", "auto") not in ("auto", "low", "high"):
                raise DataValidationError(f"{at}[{k}].image_url.detail must be one of auto, low, high", line)
            try:
                read_image(image["url"])
            except ValueError as exc:
                raise DataValidationError(f"{at}[{k}].image_url.url: {exc}", line) from None
        else:
            raise DataValidationError(f"{at}[{k}].type must be 'text' or 'image_url', got {kind!r}", line)


# Images train in padded batches: a packed row would put several examples' image blocks in one sequence.
IMAGES_UNPACKED = "the training data has images, which train in padded batches: leave `Dataset.packing` off"


def text_of(content: Any) -> str:
    """A validated message's text: its string, or its text parts joined (its images left out)."""
    if isinstance(content, list):
        return "".join(part["text"] for part in content if part["type"] == "text")
    return content or ""


def record_images(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``image_url`` objects of a validated chat record's messages, in order."""
    return [
        part["image_url"]
        for msg in rec.get("messages") or ()
        if isinstance(msg.get("content"), list)
        for part in msg["content"]
        if part["type"] == "image_url"
    ]


def _validate_calls(calls: Any, at: str, role: str, line: int) -> None:
    if role != "assistant":
        raise DataValidationError(f"{at}: only an assistant message has tool calls", line)
    if not isinstance(calls, list) or not calls:
        raise DataValidationError(f"{at} must be a non-empty array", line)
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataValidationError(f"{at}[{k}] must be an object with 'function': {{'name', 'arguments'}}", line)
        args = fn.get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise DataValidationError(f"{at}[{k}].function.arguments must be a JSON object, as a string", line)


def _validate_tools(rec: dict[str, Any], messages: list[dict[str, Any]], line: int, where: str = "tools") -> None:
    """A chat record's ``tools`` (a preference record's ``input.tools``): function definitions whose names
    its calls use; each tool message answers an earlier call."""
    if "functions" in rec or any("function_call" in m for m in messages):
        raise DataValidationError(
            "'functions' / 'function_call' (OpenAI's deprecated function calling) are not supported: "
            "give 'tools' and assistant 'tool_calls' instead",
            line,
        )
    tools = rec.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise DataValidationError(f"field '{where}' must be an array, got {json_type(tools)}", line)
        for k, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise DataValidationError(f"{where}[{k}] must be an object with 'function': {{'name', ...}}", line)
            if not isinstance(fn.get("parameters", {}), dict):
                raise DataValidationError(f"{where}[{k}].function.parameters must be a JSON schema (an object)", line)
    names = {t["function"]["name"] for t in tools or ()}
    ids: set[Any] = set()
    for j, msg in enumerate(messages):
        for call in msg.get("tool_calls") or ():
            if call["function"]["name"] not in names:
                raise DataValidationError(
                    f"messages[{j}] calls {call['function']['name']!r}, which is not one of the record's '{where}'",
                    line,
                )
            ids.add(call.get("id"))
        if msg["role"] == "tool" and msg["tool_call_id"] not in ids:
            raise DataValidationError(
                f"messages[{j}].tool_call_id {msg['tool_call_id']!r} answers no earlier tool call", line
            )


def _validate_preference(rec: dict[str, Any], line: int) -> None:
    """A prompt conversation and one preferred and one other assistant reply, in OpenAI's or TRL's form."""
    if any(key in rec for key in _OPENAI_PAIR):
        _validate_openai_preference(rec, line)
    else:
        _validate_trl_preference(rec, line)


def _validate_trl_preference(rec: dict[str, Any], line: int) -> None:
    if "prompt" not in rec:
        raise DataValidationError(
            "record has 'chosen'/'rejected' but no 'prompt' (conversations with an implicit prompt are not "
            "supported: give the prompt apart)",
            line,
        )
    prompt = rec["prompt"]
    if not isinstance(prompt, str):
        _validate_messages(prompt, "prompt", line)
        if prompt[-1]["role"] == "assistant":
            raise DataValidationError("the last of 'prompt' must not be the assistant's: the replies answer it", line)
    replies = []
    for key in _TRL_PAIR:
        if key not in rec:
            raise DataValidationError(f"record is missing required field '{key}'", line)
        value = rec[key]
        if not isinstance(value, str):
            if not isinstance(value, list):
                raise DataValidationError(f"field '{key}' must be a string or an array, got {json_type(value)}", line)
            _validate_messages(value, key, line)
            if len(value) != 1 or value[0]["role"] != "assistant":
                raise DataValidationError(f"field '{key}' must hold exactly one assistant message", line)
            value = value[0]["content"]
        replies.append(value)
    if replies[0] == replies[1]:
        raise DataValidationError("'chosen' and 'rejected' are the same reply: there is nothing to prefer", line)


def _validate_openai_preference(rec: dict[str, Any], line: int) -> None:
    prompt = rec.get("input")
    if not isinstance(prompt, dict):
        got = json_type(prompt) if "input" in rec else "nothing"
        raise DataValidationError(f"field 'input' must be an object with 'messages', got {got}", line)
    _validate_messages(prompt.get("messages"), "input.messages", line, tools=True)
    if prompt["messages"][-1]["role"] == "assistant":
        raise DataValidationError(
            "the last of 'input.messages' must not be the assistant's: the outputs answer it", line
        )
    replies = []
    for key in _OPENAI_PAIR:
        if key not in rec:
            raise DataValidationError(f"record is missing required field '{key}'", line)
        _validate_messages(rec[key], key, line, tools=True)
        if len(rec[key]) != 1 or rec[key][0]["role"] != "assistant":
            raise DataValidationError(f"field '{key}' must hold exactly one assistant message", line)
        replies.append({k: rec[key][0].get(k) for k in ("content", "tool_calls")})
    # OpenAI's `input.tools`: each reply's calls (and the input's) name them, as a chat record's do.
    _validate_tools(prompt, [*prompt["messages"], *(rec[key][0] for key in _OPENAI_PAIR)], line, where="input.tools")
    if replies[0] == replies[1]:
        raise DataValidationError(
            "'preferred_output' and 'non_preferred_output' are the same reply: there is nothing to prefer", line
        )


def _decode(data: bytes) -> str:
    """UTF-8 text, or an error naming the first line that is binary or not UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" not in data:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    # Slow path only on failure. Splitting on b"\n" is safe: 0x0A never occurs inside a UTF-8
    # multi-byte sequence, so each line decodes on its own exactly when the whole file does.
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if b"\x00" in raw:
            raise DataValidationError("not valid UTF-8 text (NUL bytes: is this a binary file?)", i)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataValidationError(f"not valid UTF-8 text (bad byte at column {e.start + 1})", i) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _bad_json(e: json.JSONDecodeError) -> DataValidationError:
    return DataValidationError(f"invalid JSON ({e.msg} at column {e.colno})", e.lineno)


def _too_deep(line: int) -> DataValidationError:
    # json gives up on deep nesting with a RecursionError (`[` x 100000 is enough); no record is that deep.
    return DataValidationError("invalid JSON (nested too deeply)", line)


def _parse_array(text: str) -> list[tuple[int, Any]]:
    """Records of a JSON array with the line each starts on (a raw_decode scan keeps positions)."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    out: list[tuple[int, Any]] = []
    pos = skip_ws(text.index("[") + 1)
    if pos < n and text[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= n:
                raise DataValidationError("invalid JSON (unterminated array)", line_of(n))
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _bad_json(e) from None
            except RecursionError:
                raise _too_deep(line_of(pos)) from None
            out.append((line_of(pos), value))
            pos = skip_ws(end)
            if pos < n and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos += 1
                break
            raise DataValidationError("invalid JSON (expected ',' or ']' after a record)", line_of(min(pos, n)))
    pos = skip_ws(pos)
    if pos < n:
        raise DataValidationError("invalid JSON (extra data after the array)", line_of(pos))
    return out


def _parse_jsonl(text: str) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataValidationError(f"invalid JSON ({e.msg} at column {e.colno})", i) from None
        except RecursionError:
            raise _too_deep(i) from None
        out.append((i, value))
    return out


def _parse_file(path: str | Path, max_bytes: int | None = None) -> tuple[Format, list[dict[str, Any]], int]:
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DataValidationError(f"file is {size} bytes, over the limit of {max_bytes} bytes")
    text = _decode(path.read_bytes())
    if not text.strip():
        raise DataValidationError("file is empty")
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    items = _parse_array(text) if text.lstrip().startswith("[") else _parse_jsonl(text)
    if not items:
        raise DataValidationError("file has no records")
    fmt: Format | None = None
    for line, rec in items:
        fmt = _validate_record(rec, line, fmt)
    assert fmt is not None
    return fmt, [rec for _, rec in items], n_lines


def inspect_training_file(path: str | Path, *, max_bytes: int | None = None) -> FileStats:
    """Validate a training file without a tokenizer (cheap enough for upload time).

    Args:
        path: A JSON array or JSONL file of Alpaca or chat records.
        max_bytes: Reject files larger than this.

    Returns:
        The detected format, number of records and number of lines.

    Raises:
        DataValidationError: Naming the first bad line: empty or binary file, invalid JSON, a record
            with a missing or mistyped field, or records of both formats.
    """
    fmt, records, n_lines = _parse_file(path, max_bytes)
    counts = [len(record_images(rec)) for rec in records] if fmt == "chat" else [0]
    return FileStats(format=fmt, n_records=len(records), n_lines=n_lines, n_images=sum(counts), max_images=max(counts))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Validate like :func:`inspect_training_file` and return the records in file order."""
    return _parse_file(path)[1]
