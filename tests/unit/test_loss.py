"""The optimised loss computes what the plain one does.

``causal_lm_loss`` applies the lm_head only to label positions; ``reference_loss`` is HF's way (full
logits, shift, mean over labels). They must agree in value and in gradients, with right and left
padding and masked prompts, and bf16 autocast must stay close to fp32.
"""

from __future__ import annotations

import pytest
import torch

from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import LoraSection
from sqft_service.training.data import Collator, TokenizedExample
from sqft_service.training.loss import IGNORE_INDEX, causal_lm_loss, reference_loss
from tests.conftest import make_tiny_llama

VOCAB = 512

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(seed: int = 0) -> list[TokenizedExample]:
    """Sequences of different lengths whose first half (the prompt) is masked out of the loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 11, 17, 23):
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        n_prompt = n // 2
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        out.append(TokenizedExample(input_ids=ids, labels=labels))
    return out


def _peft_model(seed: int = 0):
    model = make_tiny_llama(VOCAB, seed=seed)
    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model, _ = build_peft_model(model, lora, seed=seed)
    # Non-zero B so the adapters change the output and receive a non-trivial gradient path.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("side", ["right", "left"])
def test_label_only_loss_equals_full_logits_loss(side):
    model = _peft_model()
    batch = Collator(pad_token_id=2, padding_side=side, pad_to_multiple_of=8)(_examples())

    out = causal_lm_loss(model, batch)
    assert out.n_labels == batch["n_label_tokens"]
    (out.loss_sum / out.n_labels).backward()
    fast_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    ref = reference_loss(model, batch)
    ref.backward()
    ref_grads = _grads(model)

    torch.testing.assert_close(out.loss_sum / out.n_labels, ref.detach(), rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name, g in fast_grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_label_only_loss_counts_correct_predictions():
    model = _peft_model()
    batch = Collator(pad_token_id=2)(_examples())
    with torch.no_grad():
        out = causal_lm_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    assert int(out.n_correct) == int((logits.argmax(-1)[keep] == labels[keep]).sum())


def test_padding_side_does_not_change_the_loss():
    model = _peft_model()
    with torch.no_grad():
        right = causal_lm_loss(model, Collator(pad_token_id=2, padding_side="right")(_examples()))
        left = causal_lm_loss(model, Collator(pad_token_id=2, padding_side="left")(_examples()))
    torch.testing.assert_close(right.loss_sum, left.loss_sum, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_loss_close_to_fp32():
    model = _peft_model()
    batch = Collator(pad_token_id=2)(_examples())
    with torch.no_grad():
        fp32 = causal_lm_loss(model, batch).loss_sum / batch["n_label_tokens"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = causal_lm_loss(model, batch)
    assert bf16.loss_sum.dtype == torch.float32  # the cross-entropy itself always runs in fp32
    torch.testing.assert_close(bf16.loss_sum / batch["n_label_tokens"], fp32, rtol=2e-2, atol=2e-2)
