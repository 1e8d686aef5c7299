"""The PEFT helpers shared by the adapter methods, and the user errors the adapters raise."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sqft_service.adapters.lora import AdapterConfigError
from sqft_service.adapters.peft_utils import base_of, check_rank, layer_index, lora_layers, matches_module
from sqft_service.adapters.sparsify import prunable_linears
from sqft_service.errors import InvalidConfigurationError, UserError
from sqft_service.training.models import ModelLoadError, resolve_model_dir
from tests.conftest import make_tiny_llama


def test_matches_module_full_name_or_dotted_suffix():
    assert matches_module("model.layers.0.self_attn.q_proj", "q_proj")
    assert matches_module("model.layers.0.self_attn.q_proj", "self_attn.q_proj")
    assert matches_module("q_proj", "q_proj")
    assert not matches_module("model.layers.0.self_attn.qq_proj", "q_proj")
    assert not matches_module("model.layers.0.self_attn.q_proj", "proj")


def test_layer_index_is_the_first_numbered_component():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("model.layers.11.experts.2.down_proj") == 11
    assert layer_index("h.0") == 0 and layer_index("7") == 7
    assert layer_index("lm_head") is None and layer_index("model.layers1.q_proj") is None


def test_prunable_linears_needs_the_index_in_the_parent_path():
    # The old rule: a Linear is prunable when an all-digit component is followed by a dot.
    old = re.compile(r"(?:^|\.)\d+\.")
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    model.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2))])
    model.lm_head = torch.nn.Linear(2, 2)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert list(prunable_linears(model)) == [n for n in linears if old.search(n)] == ["layers.0.0"]


def test_check_rank_bounds_and_message():
    assert check_rank(1, 8, "x") == 1 and check_rank(8, 8, "x") == 8
    with pytest.raises(ValueError, match=r"^ranks\[3\] has rank 9, outside \[1, 8\]$"):
        check_rank(9, 8, "ranks[3]")
    with pytest.raises(ValueError, match=r"^`s` has rank 0, outside \[1, r=4\] \(why\)$"):
        check_rank(0, 4, "`s`", max_name="r", note=" (why)")


def test_base_of_and_lora_layers():
    model = make_tiny_llama(128, 0, max_position_embeddings=64)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert base_of(peft_model) is model
    plain = torch.nn.Linear(2, 2)
    assert base_of(plain) is plain
    names = [n for n, _ in lora_layers(peft_model, "default")]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert lora_layers(peft_model, "other") == []


def test_adapter_config_error_is_an_invalid_configuration():
    err = AdapterConfigError("bad", "General.lora_config.r")
    assert isinstance(err, InvalidConfigurationError) and isinstance(err, ValueError)
    assert err.to_error() == {"code": "invalid_configuration", "message": "bad", "param": "General.lora_config.r"}
    assert AdapterConfigError("bad", param="Dataset.packing").param == "Dataset.packing"
    assert AdapterConfigError("bad").param is None


def test_model_load_error_is_a_user_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(str(tmp_path / "missing.gguf"), None)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    assert (err.value.code, err.value.param) == ("invalid_model", "model")
