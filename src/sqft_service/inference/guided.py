"""Structured outputs (chat's ``response_format``: ``json_object``, ``json_schema``): generation held to a
grammar, token by token (torch imported when called).

llguidance (the grammar engine vLLM and SGLang also use) does the hard part: a JSON schema becomes a
grammar (``LLMatcher.grammar_from_json_schema``), and a matcher per row computes, for its state, the
bitmask of the tokens that keep the answer valid, lazily, step by step. Nothing is indexed in advance,
so a schema with long strings or many items costs no more up front; an automaton-index library
(outlines-core) was tried first and dropped for that: its up-front index grows with every bounded
repetition (``maxLength``) times the vocabulary (README, "Structured outputs"). This module wraps the
engine's tokenizer for llguidance once per tokenizer and masks the logits: every token the matcher does
not allow gets -inf, and once the grammar is complete only end-of-sequence remains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequestError

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # json_object: any object
# Compact JSON (no whitespace between tokens): an unbounded whitespace rule lets a small model loop on
# spaces and newlines until max_tokens. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False}


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of the JSON documents ``schema`` allows (a ValueError saying why it can't).

    Checked without a tokenizer, so an unsupported schema is refused when the request is validated."""
    from llguidance import LLMatcher

    return checked_grammar(
        lambda: LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS),
        "this JSON schema is not supported",
    )


def checked_grammar(build: Any, refusal: str) -> str:
    """The grammar ``build()`` makes, validated by llguidance; a ValueError ``refusal: why`` if it fails."""
    from llguidance import LLMatcher

    try:
        grammar = build()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{refusal}: {exc}"[:500]) from exc
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(f"{refusal}: {messages[0]}"[:500])
    return grammar


class GuideTokenizers:
    """llguidance's view of each tokenizer, built once, kept as long as the engine keeps the tokenizer
    (used from the engine's one worker thread, or a batch job's one thread)."""

    def __init__(self) -> None:
        self._built: dict[tuple[int, int], Any] = {}

    def get(self, tokenizer: Any, eos: int) -> Any:
        from llguidance.hf import from_tokenizer

        if (found := self._built.get((id(tokenizer), eos))) is None:
            try:
                found = self._built[(id(tokenizer), eos)] = from_tokenizer(tokenizer, eos_token=eos)
            except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads fast ones only
                raise InvalidRequestError(
                    f"this model's tokenizer can't hold an answer to `response_format`: {exc}"[:500],
                    param="response_format",
                ) from exc
        return found


def guide_processor(lltokenizer: Any, grammar: str | Sequence[str | None], rows: int, prompt_len: int) -> Any:
    """A logits processor holding each of ``rows`` rows to ``grammar``, or row ``i`` to ``grammar[i]``
    (None: that row is free; a batch's greedy lines, ``InferenceEngine.generate_together``): a row's tokens
    so far advance its matcher; tokens the matcher does not allow next are set to -inf."""
    import torch
    from llguidance import LLMatcher
    from transformers import LogitsProcessor

    grammars = [grammar] * rows if isinstance(grammar, str) else list(grammar)
    matchers = [None if g is None else LLMatcher(lltokenizer, g, log_level=0) for g in grammars]
    for matcher in matchers:
        if matcher is not None and matcher.is_error():
            raise InvalidRequestError(
                f"`response_format` can't be held to: {matcher.get_error()}"[:500], param="response_format"
            )
    ended = [matcher is None for matcher in matchers]  # a free row: never masked
    size = lltokenizer.vocab_size
    words = (size + 31) // 32
    shifts = torch.arange(32, dtype=torch.int32)

    class Guided(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            bits = torch.full((rows, words), -1, dtype=torch.int32)  # an ended row: anything (it is padding)
            for row, matcher in enumerate(matchers):
                if not ended[row] and input_ids.shape[1] > prompt_len:
                    # The token generate() picked for this row; after end-of-sequence (or a stop string)
                    # generate() pads the row, which the matcher refuses: the row has ended.
                    ended[row] = matcher.is_stopped() or not matcher.consume_token(int(input_ids[row, -1]))
                if not ended[row]:
                    matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(rows, -1)[:, :size]
            if scores.shape[-1] > size:  # an output layer wider than the tokenizer: those ids never fit
                allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - size), value=False)
            return scores.masked_fill(~allowed[:, : scores.shape[-1]].to(scores.device), float("-inf"))

    return Guided()
