"""build_peft_model / target-module helpers on a tiny Llama (vocab 128, no tokenizer needed)."""

from __future__ import annotations

import pytest
import torch
from bench.tiny_llama import make_tiny_causal_lm
from transformers import LlamaForCausalLM

from sqft_service.adapters.lora import (
    AdapterConfigError,
    AdapterHandles,
    build_peft_model,
    check_target_modules,
    default_target_modules,
)
from sqft_service.config import LoraSection
from tests.conftest import make_tiny_llama


def tiny(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    return make_tiny_llama(128, seed, max_position_embeddings=64, num_hidden_layers=layers)


def test_default_targets_are_the_projections():
    assert default_target_modules(tiny()) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_default_targets_of_fused_projections_are_the_fused_ones():
    """Phi-3 computes q/k/v in one ``qkv_proj`` and gate/up in one ``gate_up_proj``: both are targeted,
    not just the unfused ``o_proj`` and ``down_proj``."""
    model = make_tiny_causal_lm("phi3", 128, max_position_embeddings=64, pad_token_id=0)
    assert default_target_modules(model) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_default_targets_fallback_excludes_lm_head():
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(4, 4))
    model.add_module("lm_head", torch.nn.Linear(4, 4))
    assert default_target_modules(model) == ["fc1"]


def test_check_target_modules_names_the_bad_entry():
    model = tiny()
    check_target_modules(model, ["q_proj", "self_attn.v_proj"])
    with pytest.raises(AdapterConfigError) as err:
        check_target_modules(model, ["q_proj", "qq_proj", "zz"], param="General.lora_config.target_module_groups")
    assert "'qq_proj'" in str(err.value) and "q_proj, k_proj" in str(err.value)
    assert err.value.param == "General.lora_config.target_module_groups"
    assert isinstance(err.value, ValueError)


def test_build_rejects_unknown_group_module():
    lora = LoraSection(
        r=8,
        neural_lora_search=True,
        target_module_groups=[["q_proj", "nope_proj"]],
        search_space=["8,4"],
    )
    with pytest.raises(AdapterConfigError) as err:
        build_peft_model(tiny(), lora)
    assert "'nope_proj'" in str(err.value)
    assert err.value.param == "General.lora_config.target_module_groups"


def test_frozen_base_only_lora_trains():
    model = tiny()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, handles = build_peft_model(model, LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    assert handles == AdapterHandles()
    names = {n for n, _ in peft_model.named_modules()}
    assert any(n.endswith("layers.1.mlp.down_proj") for n in names)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 8))
    peft_model.train()
    for _ in range(2):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        assert len(grads) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
        opt.step()
        opt.zero_grad()
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base_before[key.replace(".base_layer", "")]), key
    # The adapter did learn something (B left zero-init).
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
