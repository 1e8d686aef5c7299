"""Prompts as the model saw them in training.

* chat requests to a model trained on chat records, or to a base model: the tokenizer's chat template
  with the generation prompt (the template renders its own BOS, as in training);
* chat requests to a model trained on Alpaca records: the same Alpaca template it trained with
  (``training/prompts.py``), the user's message as the instruction, BOS only where the tokenizer adds
  one (``training/tokenization.py``). Alpaca has no turns, system prompt or tools, so exactly one user
  message is accepted; anything else is a 400 rather than a prompt the model never saw;
* tools, tool calls and tool results: as ``tool_calls.py`` renders them, in training as in serving;
* images (``image_url`` parts, user messages only): rendered and tokenized by the model's processor
  (``inference/images.py``), for image-text models only; a text-only model, or one fine-tuned on Alpaca
  records, answers 400;
* completions: the prompt text as given (plus the BOS the tokenizer adds), as OpenAI's legacy
  completions do: the client writes the whole prompt.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..tool_calls import reads_tools, template_messages
from ..training.prompts import alpaca_prompt
from ..training.tokenization import _adds_bos
from .images import image_prompt


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


def chat_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    data_format: str | None,
    tools: list[dict[str, Any]] | None = None,
    processor: Any = None,
) -> list[int]:
    """``messages`` and ``tools`` in OpenAI's chat form (``tool_calls.template_messages`` renders calls);
    a message's content is text, or parts with images (``processor``: the model's, None if it reads text only)."""
    images = has_images(messages)
    if images and (data_format == "alpaca" or processor is None):
        why = "was fine-tuned on Alpaca records, which are text" if data_format == "alpaca" else "reads text only"
        raise UserError(f"this model {why}: send no `image_url` parts", param="messages")
    if data_format == "alpaca":
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            raise UserError(
                "this model was fine-tuned on Alpaca records (instruction → output), which have no tools: "
                "send no `tools`, tool calls or tool messages",
                param="tools",
            )
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise UserError(
                "this model was fine-tuned on Alpaca records (instruction → output): send exactly one "
                "`user` message, its instruction (no system prompt, no earlier turns)",
                param="messages",
            )
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        text = alpaca_prompt({"instruction": messages[0]["content"]})
        return bos + tokenizer(text, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this model's tokenizer has no chat template, so `messages` cannot be rendered; "
            "use /v1/completions with a prompt",
            param="messages",
        )
    turns, template_tools = template_messages(messages, tools, reads_tools(tokenizer))
    if images:
        return image_prompt(processor, turns, template_tools)
    text = tokenizer.apply_chat_template(turns, tools=template_tools, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
