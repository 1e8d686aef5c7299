"""Which attention implementation a job trains with (``Training.attn_implementation``).

Models load with SDPA (training/models.py). On a CPU under bf16/fp16 autocast, PyTorch's SDPA kernel
(flash attention for CPU) has a slow backward, and the eager implementation (two GEMMs around an
fp32 softmax) trains faster on short rows (README, "Performance"). Eager keeps every layer's
``rows x heads x seq x seq`` attention probabilities for the backward, in fp32 and in the autocast
dtype, so "auto" takes it only while that stays under ``EAGER_ATTENTION_BYTES``; SDPA otherwise, in
fp32 (measured no faster there) and on a GPU (whose SDPA kernels are the fast ones).

For a model with grouped K/V heads and Llama's eager function (:func:`shares_kv_heads`), eager runs as
:func:`grouped_eager_attention` (registered as ``GROUPED_EAGER``): the same arithmetic without
transformers' ``repeat_kv``, which copies every K/V head once per query head it serves (3x on
SmolLM2, 4x on Llama 3) in every layer, every step; they weigh most in decoding (README,
"Reinforcement fine-tuning", measures it).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

EAGER_ATTENTION_BYTES = 2**30
_BYTES_PER_PROBABILITY = 4 + 2  # the fp32 softmax and its autocast-dtype copy, both kept for the backward
GROUPED_EAGER = "sqft_grouped_eager"


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's eager attention with each K/V head shared by its query heads instead of copied to them.

    Query head ``h`` reads K/V head ``h // groups`` (``repeat_kv``'s order), so the queries of one K/V
    head are consecutive: ``(b, heads, q, d)`` folds to ``(b, kv_heads, groups * q, d)`` and one
    matmul per K/V head serves them all (a view while decoding one token). A layer with logit
    soft-capping or attention sinks runs its model's own eager function instead.
    """
    if (
        kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or getattr(module, "sinks", None) is not None
    ):
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(b, kv_heads, groups * q_len, d), key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # (b, 1, q, k): the same mask for every head of a group
        scores = (scores.view(b, kv_heads, groups, q_len, -1) + attention_mask[:, :, None]).view(scores.shape)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).view(b, heads, q_len, d).transpose(1, 2).contiguous()
    return out, probs.view(b, heads, q_len, -1)


AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)
_LLAMA_EAGER_PARAMETERS = ["module", "query", "key", "value", "attention_mask", "scaling", "dropout"]


def shares_kv_heads(model: PreTrainedModel) -> bool:
    """Whether :func:`grouped_eager_attention` can stand in for ``model``'s eager attention: it has fewer
    K/V heads than query heads, and an eager function of Llama's signature (GPT-2's, say, scales
    inside and takes a head mask: it keeps its own)."""
    heads = getattr(model.config, "num_attention_heads", None)
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    eager = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    if not heads or not kv_heads or kv_heads >= heads or eager is None:
        return False
    return list(inspect.signature(eager).parameters)[:7] == _LLAMA_EAGER_PARAMETERS


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
    if requested == "eager" and shares_kv_heads(model):
        requested = GROUPED_EAGER
    if requested != current:
        model.set_attn_implementation(requested)
    chosen = model.config._attn_implementation
    return "eager" if chosen == GROUPED_EAGER else chosen
