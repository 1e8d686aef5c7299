"""Instruction data: loading and validation, prompt building, tokenization with loss masking, batching.

Two record formats are accepted, one per file:

* **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``, rendered with the
  canonical Stanford Alpaca templates; the target is ``output`` followed by the EOS token.
* **Chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, rendered
  with the tokenizer's chat template; every assistant turn (content and end-of-turn token) is the
  target, everything else is context.

A file is either a JSON array of records or JSONL (one object per non-blank line). Validation errors
name the 1-based line on which the offending record starts, so an upload can be fixed without
guessing. Nothing here imports FastAPI or the store; torch is only needed by :class:`Collator`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from sqft_service.config import DatasetSection

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

Format = Literal["alpaca", "chat"]
_ROLES = ("system", "user", "assistant")


class DataValidationError(ValueError):
    """A training file or record is unusable; the message names the line (1-based) or record.

    Attributes:
        line: The 1-based line the problem is on, or ``None`` when it is not tied to a line.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class FileStats:
    """What :func:`inspect_training_file` learned about a file."""

    format: Format
    n_records: int
    n_lines: int


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
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


def _record_format(rec: dict[str, Any], line: int) -> Format:
    if "messages" in rec:
        return "chat"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise DataValidationError(
        "record has neither 'instruction'/'output' (Alpaca format) nor 'messages' (chat format)", line
    )


def _require_str(rec: dict[str, Any], key: str, line: int, *, required: bool) -> None:
    if key not in rec:
        if required:
            raise DataValidationError(f"record is missing required field '{key}'", line)
        return
    if not isinstance(rec[key], str):
        raise DataValidationError(f"field '{key}' must be a string, got {_json_type(rec[key])}", line)


def _validate_record(rec: Any, line: int, expected: Format | None) -> Format:
    """Check one record; returns its format. ``expected`` is the format of the file's first record."""
    if not isinstance(rec, dict):
        raise DataValidationError(f"expected a JSON object, got {_json_type(rec)}", line)
    fmt = _record_format(rec, line)
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
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataValidationError("field 'messages' must be a non-empty array", line)
    for j, msg in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(msg, dict):
            raise DataValidationError(f"{where} must be an object, got {_json_type(msg)}", line)
        role = msg.get("role")
        if role not in _ROLES:
            raise DataValidationError(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", line)
        if not isinstance(msg.get("content"), str):
            got = _json_type(msg["content"]) if "content" in msg else "nothing"
            raise DataValidationError(f"{where}.content must be a string, got {got}", line)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataValidationError("'messages' has no assistant message: nothing to train on", line)
    if messages[-1]["role"] != "assistant":
        raise DataValidationError("the last message must be from the assistant", line)
    return fmt


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
    return FileStats(format=fmt, n_records=len(records), n_lines=n_lines)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Validate like :func:`inspect_training_file` and return the records in file order."""
    return _parse_file(path)[1]


# --------------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------------


def alpaca_prompt(record: dict[str, Any]) -> str:
    """The canonical Stanford Alpaca prompt (ending in ``### Response:\\n``) for one record."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(messages: list[dict[str, str]], tokenizer: Any, index: int = 0) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_target)`` pieces that concatenate to it.

    Each assistant turn's boundaries come from rendering the prefix before it with the generation
    prompt and the prefix including it: the difference is exactly what the template emits for that
    turn, so the role header stays context. Within that, the content and the end-of-turn (EOS) token
    are the target; separators after the EOS (e.g. ``"\\n"``) stay context, since the model never
    needs to produce them. Templates where prefixes don't render as prefixes of the whole
    conversation fall back to finding each assistant content in the rendered text.

    Raises:
        DataValidationError: The tokenizer has no chat template, or an assistant turn can't be found.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataValidationError(
            "the tokenizer has no chat template, so chat-format ('messages') records can't be "
            "rendered; use Alpaca-format records or a model with a chat template"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        content = msg["content"]
        start = end = -1
        if i > 0:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            if upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
                start, end = len(before), len(upto)
        if start < 0:
            found = full.find(content, cursor) if content else -1
            if found < 0:
                raise DataValidationError(
                    f"record {index}: can't locate assistant message {i} in the chat template's output"
                )
            start, end = found, found + len(content)
            if eos and full.startswith(eos, end):
                end += len(eos)
        span = full[start:end]
        # Train up to and including the end-of-turn token; what follows it is template glue.
        content_at = span.find(content) if content else 0
        eos_at = span.find(eos, content_at + len(content)) if eos and content_at >= 0 else -1
        train_end = eos_at + len(eos) if eos_at >= 0 else len(span.rstrip())
        pieces.append((full[cursor:start], False))
        pieces.append((span[:train_end], True))
        cursor = start + train_end
    pieces.append((full[cursor:], False))
    return [(text, target) for text, target in pieces if text]


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    """One training sequence; ``labels`` is ``IGNORE_INDEX`` (-100) where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset:
    """What :func:`tokenize_records` returns: the kept examples plus what happened to the rest.

    Attributes:
        examples: The examples, in record order (dropped ones left out).
        n_dropped: Records dropped because no label survived truncation and masking.
        n_truncated: Kept examples that were shortened.
    """

    examples: list[TokenizedExample] = field(default_factory=list)
    n_dropped: int = 0
    n_truncated: int = 0

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


def _record_segments(record: dict[str, Any], tokenizer: Any, index: int) -> tuple[list[tuple[str, bool]], bool]:
    """``(text, is_target)`` pieces of one record, and whether EOS must be appended to the target."""
    if "messages" in record:
        return chat_segments(record["messages"], tokenizer, index), False
    return [(alpaca_prompt(record), False), (record["output"], True)], True


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer: Any, cfg: DatasetSection) -> TokenizedDataset:
    """Tokenize validated records into masked training examples.

    Prompt and target pieces are tokenized separately (in one batched call) and concatenated, so the
    mask boundary falls exactly between them. The *source* is everything before the last target
    piece; it is truncated to ``cfg.max_source_length`` from ``cfg.truncation_side``, then the
    target is cut on the right to fit ``cfg.max_length`` (its beginning is what matters). With
    ``cfg.truncation`` false nothing is cut. ``cfg.mask_input`` masks non-target tokens,
    ``cfg.mask_response`` masks target tokens (then the prompt is trained). BOS is prepended to
    Alpaca prompts only when the tokenizer would add it itself; chat templates render their own.

    Returns:
        A :class:`TokenizedDataset`; records whose labels (after the causal shift, i.e. beyond
        position 0) are all masked are dropped and counted in ``n_dropped``.

    Raises:
        DataValidationError: Chat records with a tokenizer that has no chat template.
    """
    eos_id = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    per_record: list[tuple[list[tuple[str, bool]], bool]] = [
        _record_segments(rec, tokenizer, i) for i, rec in enumerate(records)
    ]
    texts = [text for segs, _ in per_record for text, _ in segs]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    out = TokenizedDataset()
    k = 0
    for segs, add_eos in per_record:
        ids: list[int] = []
        target: list[bool] = []
        last_target_start = 0
        for _text, is_target in segs:
            piece = all_ids[k]
            k += 1
            if is_target:
                last_target_start = len(ids)
                if add_eos and eos_id is not None:
                    piece = [*piece, eos_id]
            ids.extend(piece)
            target.extend([is_target] * len(piece))
        # Chat templates render their own BOS; Alpaca text gets it only if the tokenizer adds one.
        prefix: list[int] = bos if add_eos else []
        src_ids, src_tgt = ids[:last_target_start], target[:last_target_start]
        tgt_ids, tgt_tgt = ids[last_target_start:], target[last_target_start:]
        n_before = len(prefix) + len(ids)
        if cfg.truncation:
            room = max(cfg.max_source_length - len(prefix), 0)
            if len(src_ids) > room:
                if cfg.truncation_side == "left":
                    src_ids, src_tgt = src_ids[len(src_ids) - room :], src_tgt[len(src_tgt) - room :]
                else:
                    src_ids, src_tgt = src_ids[:room], src_tgt[:room]
            room = max(cfg.max_length - len(prefix) - len(src_ids), 0)
            tgt_ids, tgt_tgt = tgt_ids[:room], tgt_tgt[:room]
        input_ids = prefix + src_ids + tgt_ids
        flags = [False] * len(prefix) + src_tgt + tgt_tgt
        if cfg.mask_input:
            labels = [t if f else IGNORE_INDEX for t, f in zip(input_ids, flags, strict=True)]
        elif cfg.mask_response:
            labels = [IGNORE_INDEX if f else t for t, f in zip(input_ids, flags, strict=True)]
        else:
            labels = list(input_ids)
        # Position 0 is never predicted, so a label there alone would give no loss.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            out.n_dropped += 1
            continue
        out.n_truncated += len(input_ids) < n_before
        out.examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
    return out


def split_train_eval(
    examples: Sequence[Any], validation_split_percentage: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """Deterministically hold out ``validation_split_percentage`` percent of ``examples``.

    Returns:
        ``(train, eval)``, each in original order. ``eval`` is empty when the percentage is 0 or there
        are fewer than two examples; otherwise it has at least one and ``train`` keeps at least one.
    """
    n = len(examples)
    if validation_split_percentage <= 0 or n < 2:
        return list(examples), []
    n_eval = min(max(1, round(n * validation_split_percentage / 100)), n - 1)
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    held = set(perm[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


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


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of padded positions if each batch is padded to its longest sequence."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded


class Collator:
    """Pads a list of :class:`TokenizedExample` to the batch's longest (never to a fixed length).

    The result holds tensors ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads), plus
    python ints ``n_real_tokens`` (attention-mask sum), ``n_label_tokens`` (labels that take a
    loss after the causal shift, ``labels[:, 1:] != -100``) and ``n_padded_tokens`` (the tensor
    size); pop the ints before calling the model.

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
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_config(cls, tokenizer: Any, cfg: DatasetSection, pad_to_multiple_of: int | None = 8) -> Collator:
        """A collator using the tokenizer's pad token (EOS when it has none) and ``cfg.padding_side``."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        return cls(pad, cfg.padding_side, pad_to_multiple_of)

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
        return batch
