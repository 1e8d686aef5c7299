"""The shared LoRA dropout keeps nn.Dropout's distribution and shares masks only for the same input."""

from __future__ import annotations

import torch

from sqft_service.adapters.dropout import SharedInputDropout, share_lora_dropout
from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import LoraSection
from tests.conftest import make_tiny_llama


def test_keep_rate_and_scale_match_dropout():
    torch.manual_seed(0)
    drop = SharedInputDropout(0.1).train()
    x = torch.ones(400, 500)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased, like nn.Dropout


def test_same_input_shares_mask_new_input_draws_new_one():
    drop = SharedInputDropout(0.5).train()
    x = torch.randn(64, 64)
    a, b = drop(x), drop(x)
    assert a is b
    c = drop(x.clone())
    assert not torch.equal(a != 0, c != 0)
    x.add_(1.0)  # an in-place change makes it a different activation
    assert drop(x) is not c


def test_eval_is_identity_and_gradients_flow():
    drop = SharedInputDropout(0.3)
    x = torch.randn(8, 8, requires_grad=True)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.7)


def test_peft_model_uses_one_shared_dropout():
    model, _ = build_peft_model(make_tiny_llama(64), LoraSection(r=4, lora_dropout=0.1))
    mods = {id(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout") and
            "default" in getattr(m, "lora_dropout", {})}  # fmt: skip
    assert len(mods) == 1
    assert share_lora_dropout(model) == 0  # already replaced


def test_a_bf16_input_is_scaled_by_the_exact_keep_factor():
    # A mask scaled in bf16 would multiply by bf16(1/0.95) = 1.0547 (+0.2%); scaling after the mask
    # rounds each product instead, which averages out.
    torch.manual_seed(0)
    x = torch.rand(200_000, dtype=torch.bfloat16) + 0.5
    y = SharedInputDropout(0.05).train()(x)
    kept = y != 0
    ratio = (y[kept].double() / x[kept].double()).mean().item()
    assert abs(ratio - 1 / 0.95) < 1e-4, ratio
