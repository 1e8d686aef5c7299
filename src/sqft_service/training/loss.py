"""Causal-LM loss computed only where labels exist.

With a 49k vocabulary the lm_head matmul and the softmax over every position are a large share of
a step on short instruction data, yet the prompt positions are masked out of the loss anyway.
So we run the decoder, gather the hidden states of label positions, and apply the lm_head to those
rows only (the idea behind Liger's fused linear cross-entropy, without a custom kernel). The result
equals the full computation (tests/unit/test_loss.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed token cross-entropy (fp32)
    n_correct: torch.Tensor  # label tokens whose argmax prediction is right
    n_labels: int


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
    lm = _causal_lm(model)
    decoder = lm.get_decoder()
    # A packed batch has no 2-D mask but per-example position_ids (see training/packing.py).
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state
    # Position t predicts token t+1.
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    selected = hidden[:, :-1][keep]
    targets = labels[keep]
    logits = lm.get_output_embeddings()(selected).float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        n_correct = (logits.argmax(dim=-1) == targets).sum()
    return LossOutput(loss_sum=loss_sum, n_correct=n_correct, n_labels=int(targets.numel()))


def reference_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The plain way (full logits, HF's shift-and-mean) that :func:`causal_lm_loss` must match."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)
