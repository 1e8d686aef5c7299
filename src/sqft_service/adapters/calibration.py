"""Calibration text as batches, for Wanda's input norms (``sparsify.py``) and GPTQ's Hessians (``qa/gptq.py``).

Samples run together, right-padded, so each layer's GEMMs see a few thousand rows instead of one
sample's hundred or so (Wanda and GPTQ on SmolLM2: ``bench/calibration_speed.py``). Right padding needs
no attention mask: under the causal mask a sample's tokens never attend to the pads after them, and
position ids start at 0 in every row; what a pad row computes is left out of every statistic by the
real-token mask each batch comes with.
"""

from __future__ import annotations

import torch

# Tokens per calibration forward, padding included.
CALIBRATION_BATCH_TOKENS = 4096


def calibration_batches(samples: list[torch.Tensor], max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` (token ids, ``[seq]`` or ``[1, seq]``) as right-padded batches of at most ``max_tokens``
    (padding included; a longer sample alone), longest first, each with its real-token mask
    (``[batch, seq, 1]``: 1 for a token, 0 for padding). ``max_tokens`` 1: a sample at a time.

    Raises:
        ValueError: a sample of more than one row (its rows would run as one text).
    """
    if any(ids.dim() > 1 and ids.shape[0] != 1 for ids in samples):
        raise ValueError("calibration samples are one sequence each ([seq] or [1, seq])")
    flat = sorted((ids.reshape(-1) for ids in samples), key=len, reverse=True)
    groups: list[list[torch.Tensor]] = []
    for ids in flat:
        if groups and len(groups[-1][0]) * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(ids)
        else:
            groups.append([ids])
    out = []
    for group in groups:
        width = len(group[0])
        batch = torch.zeros(len(group), width, dtype=group[0].dtype)
        real = torch.zeros(len(group), width, 1)
        for row, ids in enumerate(group):
            batch[row, : len(ids)] = ids
            real[row, : len(ids)] = 1.0
        out.append((batch, real))
    return out
