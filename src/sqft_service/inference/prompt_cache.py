"""A prompt's KV cache computed once for the rows that continue it: a reinforcement job's group of
answers to one prompt (``training/sampling.py``), a request's ``n`` choices (``inference/engine.py``).
``generate()`` would run the same prompt once per row. ``generate_copies`` is the one ``generate()``
call of the engine and the reinforcement sampler."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from .greedy import GREEDY


def prompt_cache(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, group: int) -> DynamicCache:
    """The KV cache of every prompt but its last token, computed once and repeated for its ``group`` rows
    (``generate()`` then runs only the last token: a cache must leave it something to run).

    Positions count real tokens, as ``generate()`` numbers left-padded rows."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(group)
    return cache


def generate_copies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    copies: int,
    media: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``generate()`` for ``copies`` rows of each prompt (prompt-major; left-padded prompts with their
    ``mask``): the prompts run once for all their copies when there are copies to share them, and no
    sampling of the model's own (rows are drawn by a ``TokenDraw`` in ``kwargs['logits_processor']``).
    ``media``: one prompt's image inputs (``inference/images.py``), given to every copy (its prompt is
    then run per copy: generate() takes the images in the prefill it runs itself).
    ``kwargs``: generate()'s others (``max_new_tokens``, ``eos_token_id``...)."""
    shared = copies > 1 and input_ids.shape[1] > 1 and not media
    cache = prompt_cache(model, input_ids, mask, copies) if shared else None
    return model.generate(
        input_ids=input_ids.repeat_interleave(copies, 0),
        attention_mask=mask.repeat_interleave(copies, 0),
        past_key_values=cache,
        **_copied(media or {}, input_ids.shape, copies),
        **GREEDY,
        **kwargs,
    )


def _copied(media: dict[str, torch.Tensor], shape: torch.Size, copies: int) -> dict[str, torch.Tensor]:
    """Image inputs for ``copies`` rows: per-token ones (``token_type_ids``, the prompt's shape) row by row,
    the images (``pixel_values``: one row per image) once per row, in row order (how the model places
    image features on image tokens)."""
    rows = {name: value.shape[:2] == shape for name, value in media.items()}
    return {
        name: value.repeat_interleave(copies, 0) if rows[name] else value.repeat(copies, *[1] * (value.dim() - 1))
        for name, value in media.items()
    }
