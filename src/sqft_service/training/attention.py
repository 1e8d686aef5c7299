"""Which attention implementation a job trains with (``Training.attn_implementation``).

Models load with SDPA (training/models.py). On a CPU under bf16/fp16 autocast, PyTorch's SDPA kernel
(flash attention for CPU) has a slow backward, and the eager implementation (two GEMMs around an
fp32 softmax) trains faster on short rows (README, "Performance"). Eager keeps every layer's
``rows x heads x seq x seq`` attention probabilities for the backward, in fp32 and in the autocast
dtype, so "auto" takes it only while that stays under ``EAGER_ATTENTION_BYTES``; SDPA otherwise, in
fp32 (measured no faster there) and on a GPU (whose SDPA kernels are the fast ones).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

EAGER_ATTENTION_BYTES = 2**30
_BYTES_PER_PROBABILITY = 4 + 2  # the fp32 softmax and its autocast-dtype copy, both kept for the backward


def eager_attention_bytes(model: PreTrainedModel, rows: int, seq: int) -> int | None:
    """What eager attention keeps for the backward over all layers, or None if the config doesn't say."""
    heads = getattr(model.config, "num_attention_heads", None)
    layers = getattr(model.config, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    return rows * heads * seq * seq * _BYTES_PER_PROBABILITY * layers


def choose_attention(
    model: PreTrainedModel,
    requested: str,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    rows: int,
    seq: int,
) -> str:
    """Set the attention implementation of ``model`` for training and return its name.

    Args:
        model: The base model as loaded (SDPA, or its own default when it has no SDPA).
        requested: ``Training.attn_implementation``: "auto", "sdpa" or "eager".
        device: The job's device.
        autocast_dtype: The job's autocast dtype (None: fp32).
        rows: Rows of a micro-batch (``batch_size``).
        seq: The longest row (the longest example, or the packing capacity).
    """
    current = model.config._attn_implementation
    if requested == "auto":
        need = eager_attention_bytes(model, rows, seq)
        cpu_low_precision = device.type == "cpu" and autocast_dtype is not None
        fits = need is not None and need <= EAGER_ATTENTION_BYTES
        requested = "eager" if current == "sdpa" and cpu_low_precision and fits else current
    if requested != current:
        model.set_attn_implementation(requested)
    return model.config._attn_implementation
