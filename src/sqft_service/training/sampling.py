"""Sampling a reinforcement job's answers: ``group`` answers to each prompt from the model being trained.

Two things ``generate()`` would do on its own cost a reinforcement step more than they need to, so
they are done here (measured in the README, "Reinforcement fine-tuning"):

- Every prompt is read once. Its ``group`` rows are the same prompt, so the prompt (all but its last
  token) runs through the model once per prompt and its KV cache is repeated ``group`` times; the
  rows then decode from there, each drawing its own tokens.
- A token is drawn by the inverse CDF (``inference/draw.py``), one uniform number per row, instead
  of ``torch.multinomial``'s exponential per vocabulary entry. The distribution is the same: softmax
  of the (guided) scores over the temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from ..inference.draw import TokenDraw
from ..inference.greedy import left_padded
from ..inference.prompt_cache import generate_copies


@torch.no_grad()
def sample_answers(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    group: int,
    *,
    max_tokens: int,
    temperature: float | None,
    pad_id: int,
    eos_ids: Sequence[int],
    processors: Callable[[int, int], Any] | None = None,
) -> list[list[int]]:
    """``group`` answers to each prompt (prompt-major), each cut after its first end token (kept: the model
    learns to stop). ``temperature`` None: greedy (``group`` is then 1). ``processors(rows, width)``: the
    logits processors of a batch of ``rows`` rows whose answers start at column ``width`` (a format's guide)."""
    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in left_padded(prompts, pad_id))
    width, rows = input_ids.shape[1], len(prompts) * group
    chain = LogitsProcessorList(processors(rows, width) if processors is not None else [])
    if temperature is not None:
        chain.append(TokenDraw([temperature] * rows))
    out = generate_copies(
        model,
        input_ids,
        mask,
        group,
        max_new_tokens=max_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
        logits_processor=chain,
    )
    ends = set(eos_ids)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((j for j, t in enumerate(row) if t in ends), None)
        answers.append(row if stop is None else row[: stop + 1])
    return answers
