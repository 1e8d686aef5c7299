"""Greedy generation for many prompts at once, each row the tokens its prompt gets alone (evaluate
jobs' answers, batch jobs' lines: a sampled line's row draws through its ``processors``,
``inference/draw.py``; torch imported when called)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .images import media_of, stack_inputs

# generate() without the model's own sampling defaults (a top_k, top_p or temperature in its config).
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def left_padded(rows: Sequence[list[int]], pad: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``rows`` padded on the left: every row ends at the last column,
    where generation begins."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return input_ids, mask


def greedy_tokens(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: Sequence[int],
    batch_size: int,
    *,
    pad: int | None,
    eos: set[int],
    processors: Callable[[list[int], int], Any] | None = None,
) -> list[list[int]]:
    """The tokens greedy decoding generates after each prompt, ``batch_size`` prompts per ``generate()``.

    Prompts of similar length go together (fewer padding tokens); each batch is padded on the left with
    an attention mask, so every prompt ends where generation begins and sees only its own tokens, and
    runs to its rows' largest ``max_new_tokens``. Greedy tokens don't depend on later ones, so a row cut
    at its own ``max_new_tokens`` or first end-of-sequence id (the caller's to cut: a row that ended is
    padded on) holds what the prompt generates alone. A batch that does not fit in the device's memory
    is halved (``training/memory.in_fitting_batches``).

    Args:
        pad: The padding id (the tokenizer's); None: the smallest of ``eos``.
        processors: ``(the batch's prompt indices, its padded width)`` → a ``logits_processor`` for its
            ``generate()`` (structured outputs' guides, per row), or None.
    """
    import torch

    from ..training.device import model_device
    from ..training.memory import in_fitting_batches

    device = model_device(model)
    pad = pad if pad is not None else min(eos)
    rows: list[list[int]] = [[] for _ in prompts]

    def generate(batch: Sequence[int]) -> None:
        input_ids, mask = (t.to(device) for t in left_padded([prompts[i] for i in batch], pad))
        width = input_ids.shape[1]
        media = batch_media([prompts[i] for i in batch], width)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                **{key: value.to(device) for key, value in media.items()},
                max_new_tokens=max(max_new_tokens[i] for i in batch),
                **GREEDY,
                pad_token_id=pad,
                eos_token_id=sorted(eos),
                logits_processor=processors(list(batch), width) if processors else None,
            )
        for i, row in zip(batch, out[:, width:].tolist(), strict=True):
            rows[i] = row

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    in_fitting_batches(order, batch_size, generate, device)
    return rows


def batch_media(prompts: Sequence[list[int]], width: int) -> dict[str, Any]:
    """The image inputs of left-padded prompts (``inference/images.py``), as one ``generate()`` takes them:
    per-image inputs (``pixel_values``) in row order, per-token ones (``token_type_ids``) padded on the left
    with zeros like the rows; {} when no prompt has images."""
    import torch

    media = [media_of(p) or {} for p in prompts]
    keys = {key for m in media for key in m}
    out = {}
    for key in keys:
        if key.endswith("token_type_ids"):
            rows = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, (prompt, m) in enumerate(zip(prompts, media, strict=True)):
                if key in m:
                    rows[row, width - len(prompt) :] = m[key].reshape(-1)
            out[key] = rows
        else:
            out[key] = stack_inputs([m[key] for m in media if key in m])
    return out
