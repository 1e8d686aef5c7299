"""A prompt's KV cache computed once for the rows that continue it: a reinforcement job's group of
answers to one prompt (``training/sampling.py``), a request's ``n`` choices (``inference/engine.py``).
``generate()`` would run the same prompt once per row."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
