"""Prompts as the model saw them in training.

* chat requests to a model trained on chat records, or to a base model: the tokenizer's chat template
  with the generation prompt (the template renders its own BOS, as in training);
* chat requests to a model trained on Alpaca records: the same Alpaca template it trained with
  (``training/prompts.py``), the user's message as the instruction, BOS only where the tokenizer adds
  one (``training/tokenization.py``). Alpaca has no turns or system prompt, so exactly one user
  message is accepted; anything else is a 400 rather than a prompt the model never saw;
* completions: the prompt text as given (plus the BOS the tokenizer adds), as OpenAI's legacy
  completions do: the client writes the whole prompt.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..training.prompts import alpaca_prompt
from ..training.tokenization import _adds_bos


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], data_format: str | None) -> list[int]:
    if data_format == "alpaca":
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
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
