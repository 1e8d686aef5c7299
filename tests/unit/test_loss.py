"""The optimised loss computes what the plain one does.

``causal_lm_loss`` applies the lm_head only to label positions; ``reference_loss`` is HF's way (full
logits, shift, mean over labels). They must agree in value and in gradients, with right and left
padding and masked prompts, and bf16 autocast must stay close to fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import LoraSection
from sqft_service.training.batching import Collator
from sqft_service.training.loss import causal_lm_loss
from sqft_service.training.packing import PackingCollator, separates_packed_examples
from sqft_service.training.tokenization import IGNORE_INDEX, TokenizedExample
from tests.conftest import make_tiny_llama, randomize_b

VOCAB = 512

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The plain way (full logits, HF's shift-and-mean) that ``causal_lm_loss`` must match."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


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


@pytest.mark.parametrize("chunk_rows", [1, 5, None], ids=["chunk1", "chunk5", "one-chunk"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_label_only_loss_equals_full_logits_loss(side, chunk_rows):
    """Also over chunk sizes: the chunked cross-entropy's early gradients equal autograd's."""
    model = _peft_model()
    batch = Collator(pad_token_id=2, padding_side=side, pad_to_multiple_of=8)(_examples())

    out = causal_lm_loss(model, batch, chunk_rows=chunk_rows)
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


def test_adapted_lm_head_takes_the_plain_path_and_still_matches():
    """LoRA on the lm_head makes it trainable: the loss falls back to autograd and still trains it."""
    model = make_tiny_llama(VOCAB, seed=0)
    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"])
    model, _ = build_peft_model(model, lora)
    randomize_b(model)
    batch = Collator(pad_token_id=2)(_examples())
    out = causal_lm_loss(model, batch, chunk_rows=2)
    (out.loss_sum / out.n_labels).backward()
    grads = _grads(model)
    assert any("lm_head" in name for name in grads)
    model.zero_grad(set_to_none=True)
    reference_loss(model, batch).backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_without_grad_matches():
    """Evaluation (no grad) takes the same chunks but skips the early gradient."""
    model = _peft_model()
    batch = Collator(pad_token_id=2)(_examples())
    with_grad = causal_lm_loss(model, batch, chunk_rows=3)
    with torch.no_grad():
        no_grad = causal_lm_loss(model, batch, chunk_rows=3)
    assert not no_grad.loss_sum.requires_grad and with_grad.loss_sum.requires_grad
    torch.testing.assert_close(no_grad.loss_sum, with_grad.loss_sum.detach())
    assert int(no_grad.n_correct) == int(with_grad.n_correct)


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


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("capacity", [64, 25, 1])
def test_packed_loss_and_gradients_equal_unpacked(capacity):
    """Packed rows (position_ids restart, no 2-D mask) give the unpacked batch's loss and gradients.

    capacity 64 puts all four examples in one row, 25 makes rows of mixed fill with tail padding,
    1 leaves one example per row (every row but the longest padded).
    """
    examples = _examples()
    packed_batch = PackingCollator(pad_token_id=2, capacity=capacity)(examples)
    assert packed_batch["n_rows"] == {64: 1, 25: 3, 1: 4}[capacity]
    results = []
    for batch in (Collator(pad_token_id=2, pad_to_multiple_of=None)(examples), packed_batch):
        model = _peft_model()
        out = causal_lm_loss(model, batch)
        (out.loss_sum / out.n_labels).backward()
        results.append((out, _grads(model)))
    (plain, plain_grads), (packed, packed_grads) = results
    assert packed.n_labels == plain.n_labels == packed_batch["n_label_tokens"]
    assert packed_batch["n_real_tokens"] == sum(len(e) for e in examples)
    torch.testing.assert_close(packed.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(packed.n_correct) == int(plain.n_correct)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_without_position_restarts_leak_across_examples():
    """The control: the same row with one running position sequence is one long causal sequence."""
    batch = PackingCollator(pad_token_id=2, capacity=64)(_examples())
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).unsqueeze(0))
    with torch.no_grad():
        model = _peft_model()
        separated = causal_lm_loss(model, batch).loss_sum
        leaked = causal_lm_loss(model, leaky).loss_sum
    # Packed and unpacked agree to 1e-5; attending across examples moves the sum far more.
    assert float((separated - leaked).abs()) > 1e-2


def test_packed_loss_matches_the_full_logits_reference():
    batch = PackingCollator(pad_token_id=2, capacity=25)(_examples())
    with torch.no_grad():
        model = _peft_model()
        out = causal_lm_loss(model, batch)
        torch.testing.assert_close(out.loss_sum / out.n_labels, reference_loss(model, batch), rtol=1e-5, atol=1e-5)


def test_packing_support_is_detected(monkeypatch):
    import transformers.masking_utils as masking

    model = make_tiny_llama(VOCAB).train()
    assert separates_packed_examples(model)
    assert model.training  # the probe restores the mode
    # A model whose mask ignores position_ids (as some remote-code models do) attends across examples.
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not separates_packed_examples(model)
