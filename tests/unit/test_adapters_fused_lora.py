"""FusedLoraLinear computes exactly what stock peft's lora.Linear does (forward, grads, merge, save)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer

from sqft_service.adapters.fused_lora import FusedLoraLinear, fuse_lora_layers
from tests.conftest import make_tiny_llama


def _pair():
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    stock = get_peft_model(make_tiny_llama(64), cfg)
    for name, p in stock.named_parameters():  # non-zero B so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fused = copy.deepcopy(stock)
    assert fuse_lora_layers(fused) == 2 * 4
    return stock, fused


def test_forward_and_grads_match_stock_peft():
    stock, fused = _pair()
    ids = torch.randint(0, 64, (3, 9))
    for model in (stock, fused):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_disabled_merged_and_saved_behave_like_stock(tmp_path):
    stock, fused = _pair()
    ids = torch.randint(0, 64, (2, 7))
    with fused.disable_adapter():
        base_logits = fused(input_ids=ids).logits
    assert not torch.allclose(base_logits, fused(input_ids=ids).logits)
    fused.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(64), tmp_path)
    assert all(type(m) is not FusedLoraLinear for m in reloaded.modules())
    assert any(isinstance(m, lora_layer.Linear) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    merged = fused.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
