"""Prompt building: the Alpaca templates and chat rendering split into context and target pieces.

* **Alpaca** records are rendered with the canonical Stanford Alpaca templates; the target is
  ``output`` (tokenization appends the EOS token).
* **Chat** records are rendered with the tokenizer's chat template; every assistant turn (content
  and end-of-turn token) is the target, everything else is context.
"""

from __future__ import annotations

from typing import Any

from ..tool_calls import reads_tools, template_messages
from .records import DataValidationError

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict[str, Any]) -> str:
    """The canonical Stanford Alpaca prompt (ending in ``### Response:\\n``) for one record."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(
    messages: list[dict[str, Any]], tokenizer: Any, index: int = 0, tools: list[dict[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_target)`` pieces that concatenate to it.

    Tools, tool calls and tool results are rendered as ``tool_calls.template_messages`` has them (as
    serving renders them); an assistant turn's calls are its target like its text. An assistant turn
    of ``weight`` 0 (OpenAI's) is context.

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
    messages, tools = template_messages(messages, tools, reads_tools(tokenizer))
    full = _render(tokenizer, messages, tools, generation_prompt=False)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        content = msg["content"] or ""
        start = end = -1
        if i > 0:
            before = _render(tokenizer, messages[:i], tools, generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], tools, generation_prompt=False)
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
        pieces.append((span[:train_end], msg.get("weight", 1) != 0))
        cursor = start + train_end
    pieces.append((full[cursor:], False))
    return [(text, target) for text, target in pieces if text]
