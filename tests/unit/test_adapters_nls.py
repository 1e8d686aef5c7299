"""Neural Low-rank Adapter Search: controller, statistics, sub-adapter selection and extraction."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from sqft_service.adapters.lora import build_peft_model
from sqft_service.adapters.nls import (
    ELASTIC_CONFIG_FILE,
    elastic_adapter_config,
    extract_sub_adapter,
    select_ranks,
    write_elastic_adapter_config,
)
from sqft_service.config import LoraSection
from tests.conftest import make_tiny_llama, randomize_b

GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj", "down_proj"], ["o_proj", "gate_proj"]]
SPACES = ["8,6,4", "8,4", "8,7,5,2"]
N_LAYERS = 3


def tiny(seed: int = 0) -> LlamaForCausalLM:
    return make_tiny_llama(128, seed, max_position_embeddings=64, num_hidden_layers=N_LAYERS)


def nls_section(spaces=SPACES, dropout=0.0) -> LoraSection:
    return LoraSection(
        r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        neural_lora_search=True,
        target_module_groups=GROUPS,
        search_space=spaces,
    )


@pytest.fixture
def nls():
    peft_model, handles = build_peft_model(tiny(), nls_section(), seed=7)
    return peft_model, handles.nls


def test_dimensions_are_group_major(nls):
    _, ctrl = nls
    dims = ctrl.dimensions
    assert len(dims) == len(GROUPS) * N_LAYERS
    assert [(d.group, d.layer) for d in dims] == [(g, i) for g in range(3) for i in range(N_LAYERS)]
    assert [d.index for d in dims] == list(range(9))
    assert dims[4].modules == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert dims[0].space == [8, 6, 4] and dims[8].space == [8, 7, 5, 2]
    assert ctrl.rank_mask.shape == (9, 8)


def test_sampling_is_deterministic_per_step_and_varies(nls):
    _, ctrl = nls
    a = ctrl.sample(3)
    assert all(r in d.space for r, d in zip(a, ctrl.dimensions, strict=True))
    assert build_peft_model(tiny(), nls_section(), seed=7)[1].nls.sample(3) == a
    draws = [tuple(ctrl.sample(s)) for s in range(20)]
    assert len(set(draws)) > 10
    assert ctrl.sample(3) == a
    # The mask reflects the draw: row d has exactly r_d ones, leading.
    for d, r in enumerate(a):
        assert ctrl.rank_mask[d].tolist() == [1.0] * r + [0.0] * (8 - r)
    differ = build_peft_model(tiny(), nls_section(), seed=8)[1].nls
    assert [tuple(differ.sample(s)) for s in range(20)] != draws


def test_activate_validates(nls):
    _, ctrl = nls
    with pytest.raises(ValueError, match="expected 9 ranks"):
        ctrl.activate([8] * 8)
    with pytest.raises(ValueError, match=r"ranks\[3\] = 5 is not in the search space \[8, 4\]"):
        ctrl.activate([8, 8, 8, 5, 8, 8, 8, 8, 8])


def test_masked_rank_matches_truncated_adapter_and_grads(nls):
    peft_model, ctrl = nls
    randomize_b(peft_model)
    ranks = [6, 4, 8, 4, 8, 4, 2, 7, 5]
    ctrl.activate(ranks)
    layer = peft_model.base_model.model.model.layers[2].self_attn.o_proj  # dim 8 (group 2, layer 2)
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = layer.base_layer(x) + x @ a[:5].T @ b[:, :5].T * layer.scaling["default"]
    assert layer.scaling["default"] == 2.0  # lora_alpha / max rank, not rescaled
    out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out.sum().backward()
    assert torch.count_nonzero(a.grad[5:]) == 0 and torch.count_nonzero(a.grad[:5]) > 0
    assert torch.count_nonzero(b.grad[:, 5:]) == 0 and torch.count_nonzero(b.grad[:, :5]) > 0


def test_hooks_not_in_checkpoint_and_removable(nls, tmp_path):
    peft_model, ctrl = nls
    randomize_b(peft_model)
    ids = torch.randint(0, 128, (1, 6))
    ctrl.activate_maximal()
    full = peft_model(input_ids=ids).logits
    ctrl.activate(select_ranks({"dimensions": ctrl.describe()}, "minimal"))
    small = peft_model(input_ids=ids).logits
    assert not torch.allclose(full, small)
    peft_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ctrl.remove()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, full, atol=0, rtol=0)


def test_single_value_space_equals_plain_lora_bit_for_bit():
    def train(lora, nls_on):
        torch.manual_seed(123)
        model, handles = build_peft_model(tiny(), lora, seed=3)
        torch.manual_seed(99)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for step in range(3):
            if nls_on:
                assert handles.nls.sample(step) == [8] * 9
            ids = torch.randint(0, 128, (2, 8))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        return model(input_ids=torch.arange(10).unsqueeze(0)).logits

    single = nls_section(spaces=["8", "8", "8"], dropout=0.1)
    plain = LoraSection(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=[m for g in GROUPS for m in g])
    assert torch.equal(train(single, True), train(plain, False))


def test_stats_count_steps(nls, tmp_path):
    _, ctrl = nls
    for step in range(12):
        ctrl.sample(step)
        ctrl.record_loss(float(step))
    stats = json.loads(json.dumps(ctrl.stats()))
    assert stats["n_dimensions"] == 9
    for dim in stats["dimensions"]:
        ranks = dim["ranks"]
        assert sum(v["draws"] for v in ranks.values()) == 12
        assert sum(v["loss_steps"] for v in ranks.values()) == 12
        total = sum(v["mean_loss"] * v["loss_steps"] for v in ranks.values() if v["loss_steps"])
        assert total == pytest.approx(sum(range(12)))
    path = ctrl.save_stats(tmp_path)
    assert path.name == "nls_stats.json" and json.loads(path.read_text()) == stats


def test_elastic_config_and_select_ranks(nls, tmp_path):
    _, ctrl = nls
    lora = nls_section()
    cfg = elastic_adapter_config(ctrl, lora)
    assert cfg["r"] == 8 and cfg["search_space"] == SPACES and cfg["order"].startswith("group-major")
    assert len(cfg["dimensions"]) == 9 and cfg["dimensions"][3]["group_modules"] == GROUPS[1]
    path = write_elastic_adapter_config(ctrl, lora, tmp_path)
    cfg = json.loads(path.read_text())
    assert select_ranks(cfg, "maximal") == [8] * 9
    assert select_ranks(cfg, "heuristic") == [6] * 3 + [8] * 3 + [7] * 3
    assert select_ranks(cfg, "minimal") == [4] * 3 + [4] * 3 + [2] * 3
    custom = [6, 4, 8, 4, 8, 4, 2, 7, 5]
    assert select_ranks(cfg, "mine", custom) == custom
    with pytest.raises(ValueError, match="give custom_config with 9 values"):
        select_ranks(cfg, "mine")
    with pytest.raises(ValueError, match=r"expected 9 values = groups x layers = 3 x 3"):
        select_ranks(cfg, "mine", custom[:-1])
    bad = list(custom)
    bad[5] = 6
    with pytest.raises(ValueError) as err:
        select_ranks(cfg, "mine", bad)
    assert str(err.value) == (
        "custom_config[5] = 6 is not in the search space [8, 4] of dimension 5 (layer 2, group 1)"
    )


def test_heuristic_of_three_is_middle():
    cfg = {"dimensions": [{"space": [16, 12, 8]}, {"space": [16, 8]}, {"space": [32, 24, 16, 8]}]}
    assert select_ranks(cfg, "heuristic") == [12, 16, 24]


def test_extracted_sub_adapter_matches_elastic_model(nls, tmp_path):
    peft_model, ctrl = nls
    randomize_b(peft_model)
    super_dir, sub_dir = tmp_path / "super", tmp_path / "sub"
    peft_model.save_pretrained(super_dir)
    write_elastic_adapter_config(ctrl, nls_section(), super_dir)
    cfg = json.loads((super_dir / ELASTIC_CONFIG_FILE).read_text())
    ranks = [6, 4, 8, 4, 8, 4, 2, 7, 5]  # heterogeneous, also across layers of one group
    summary = extract_sub_adapter(super_dir, sub_dir, select_ranks(cfg, "custom", ranks))
    assert summary["ranks"] == ranks and summary["path"] == str(sub_dir)

    ctrl.activate(ranks)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        elastic = peft_model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. unmatched rank_pattern keys
        loaded = PeftModel.from_pretrained(tiny(), str(sub_dir)).eval()
    layers = loaded.base_model.model.model.layers
    assert layers[1].self_attn.k_proj.r["default"] == 4
    assert layers[2].mlp.down_proj.lora_A["default"].weight.shape == (4, 32)
    assert layers[2].mlp.gate_proj.r["default"] == 5
    assert layers[2].mlp.gate_proj.scaling["default"] == pytest.approx(2.0)
    n_lora = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    assert n_lora == summary["n_params"]
    with torch.no_grad():
        stock = loaded(input_ids=ids).logits
    torch.testing.assert_close(stock, elastic, atol=1e-5, rtol=0)
    ctrl.activate_maximal()
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, stock, atol=1e-4)


def test_mask_follows_dtype_changes_after_build(nls):
    peft_model, ctrl = nls
    randomize_b(peft_model)
    peft_model.double()  # a cast after building (as .to(device) would) gets its own cached mask copy
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj  # dimension 0
    x = torch.randn(2, 16, dtype=torch.float64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for step in range(3):
        r = ctrl.sample(step)[0]
        ref = layer.base_layer(x) + x @ a[:r].T @ b[:, :r].T * 2.0
        torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=0)
