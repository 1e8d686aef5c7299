"""Mixed precision: a frozen base stored in bf16 computes what bf16 autocast over an fp32 base does.

Autocast rounds each fp32 weight to bf16 before every matmul; storing the frozen weights in bf16
once must give the same loss and the same adapter gradients, while adapters, norms and a tied
embedding stay fp32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqft_service.adapters.lora import build_peft_model
from sqft_service.adapters.sparse.peft import SparseLoraLinear
from sqft_service.adapters.sparsify import sparsify_model
from sqft_service.config import LoraSection
from sqft_service.training.batching import Collator
from sqft_service.training.loss import causal_lm_loss
from sqft_service.training.precision import autocast_dtype, cast_frozen_linears, head_cast_once
from sqft_service.training.tokenization import IGNORE_INDEX, TokenizedExample
from tests.conftest import make_tiny_llama, randomize_b

VOCAB = 512

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 19):
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    return Collator(pad_token_id=2)(examples)


def _model(*, tied: bool = False, sparse: bool = False, dropout: float = 0.0):
    base = make_tiny_llama(VOCAB, seed=3, tie_word_embeddings=tied)
    if sparse:
        sparsify_model(base, "magnitude", 0.5)
    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=dropout, sparse_adapter=sparse)
    model, _ = build_peft_model(base, lora, seed=0)
    randomize_b(model)  # non-zero B: the adapters change the output and get a full gradient path
    return model.train()


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same dropout draws in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_lm_loss(model, batch)
    (out.loss_sum / out.n_labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), grads


@pytest.mark.parametrize(
    ("sparse", "dropout"),
    [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)],
    ids=["lora", "lora-dropout", "sparsepeft", "sparsepeft-dropout"],
)
def test_bf16_frozen_base_matches_autocast_over_fp32(sparse, dropout):
    batch = _batch()
    reference = _model(sparse=sparse, dropout=dropout)
    stored = _model(sparse=sparse, dropout=dropout)
    saved = cast_frozen_linears(stored, torch.bfloat16)

    # SparsePEFT adds its masked delta to the exact base weight, so those bases stay fp32.
    exact = {id(m.get_base_layer()) for m in stored.modules() if isinstance(m, SparseLoraLinear)}
    assert bool(exact) is sparse
    frozen = [m for m in stored.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    cast = [m for m in frozen if id(m) not in exact]
    assert cast and all(m.weight.dtype == torch.bfloat16 for m in cast)
    assert all(m.weight.dtype == torch.float32 for m in frozen if id(m) in exact)
    assert saved == sum(m.weight.numel() * 2 for m in cast)
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)

    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(stored, batch)
    assert torch.isfinite(loss) and ref_grads.keys() == grads.keys() and grads
    # The same roundings in the same order: equal up to float noise (a bf16 W under SparsePEFT's
    # W + M*delta was up to 3% off in the gradients).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tied_lm_head_and_embedding_stay_fp32():
    model = _model(tied=True)
    lm = model.get_base_model()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    cast_frozen_linears(model, torch.bfloat16)
    assert lm.model.embed_tokens.weight.dtype == torch.float32
    assert lm.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert lm.model.norm.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_lm_loss(model, _batch())
    assert torch.isfinite(out.loss_sum)


def test_a_tied_head_cast_once_for_generation_gives_autocasts_logits_and_is_given_back():
    model = _model(tied=True)
    lm = model.get_base_model()
    cast_frozen_linears(model, torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        with head_cast_once(lm, torch.bfloat16):
            assert "forward" in vars(lm.lm_head)  # the one-cast head stands in
            got = model(input_ids=ids).logits
    assert "forward" not in vars(lm.lm_head) and lm.lm_head.weight.dtype == torch.float32
    assert torch.equal(got, want)
    with head_cast_once(lm, None):  # fp32 training: nothing to cast
        assert "forward" not in vars(lm.lm_head)


@pytest.mark.parametrize(("asked", "native", "expected"), [
    ("no", True, None), ("bf16", True, torch.bfloat16), ("bf16", False, None), ("fp16", False, None),
])  # fmt: skip
def test_autocast_dtype_falls_back_with_a_warning(monkeypatch, asked, native, expected):
    from sqft_service.training import precision

    monkeypatch.setattr(precision, "native_bf16_supported", lambda: native)
    monkeypatch.setattr(precision, "native_fp16_supported", lambda: native)
    warnings: list[str] = []
    assert autocast_dtype(asked, warnings.append) is expected
    assert bool(warnings) is (asked != "no" and not native)
    assert all(asked in w and "fp32" in w for w in warnings)
