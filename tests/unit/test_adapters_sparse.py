"""SparsePEFT: the fused masked forward, its gradients, and merges that keep the base's zeros."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from sqft_service.adapters.autocast import adapter_weights
from sqft_service.adapters.lora import build_peft_model
from sqft_service.adapters.peft_utils import base_of
from sqft_service.adapters.sparse import MASK_BUFFER, SparseLoraLinear, sparsity_report
from sqft_service.adapters.sparsify import sparsify_model
from sqft_service.config import LoraSection
from sqft_service.training.precision import cast_frozen_linears
from tests.conftest import make_tiny_llama, randomize_b


def sparse_tiny(seed: int = 0) -> LlamaForCausalLM:
    model = make_tiny_llama(128, seed, max_position_embeddings=64)
    sparsify_model(model, "magnitude", 0.5)
    return model


def reference(layer, x, rank_mask=None, dropout=lambda t: t):
    """Base matmul plus the masked delta as a second matmul (the unfused formulation)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if rank_mask is not None:
        b = b * rank_mask
    delta = (b @ a) * layer.scaling["default"] * (layer.base_layer.weight != 0)
    return layer.base_layer(x) + dropout(x) @ delta.T


def sparse_peft(dropout=0.0, **extra):
    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=dropout, sparse_adapter=True, **extra)
    model, handles = build_peft_model(sparse_tiny(), lora, seed=0)
    randomize_b(model)
    return model, handles


def test_enable_switches_layers_and_keeps_checkpoint_clean(tmp_path):
    model, handles = sparse_peft()
    assert len(handles.sparse.modules) == 14
    layer = handles.sparse.modules["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, SparseLoraLinear) and isinstance(layer, LoraLinear)
    mask = getattr(layer, MASK_BUFFER)
    assert mask.dtype == torch.bool and torch.equal(mask, layer.base_layer.weight != 0)
    assert 0.45 < handles.sparse.density()["model.layers.0.self_attn.q_proj"] < 0.55
    assert not any(MASK_BUFFER in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)


def test_fused_forward_and_grads_match_reference():
    _, handles = sparse_peft()
    layer = handles.sparse.modules["model.layers.1.mlp.down_proj"]
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = layer(x)
    ref = reference(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    plain = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
    assert not torch.allclose(out, plain, atol=1e-3)  # the mask matters
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.randn_like(out)
    ga, gb, gx = torch.autograd.grad((out * g).sum(), (a, b, x))
    ra, rb, rx = torch.autograd.grad((ref * g).sum(), (a, b, x))
    torch.testing.assert_close(ga, ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)


def test_dropout_path_matches_reference_in_training():
    model, handles = sparse_peft(dropout=0.3)
    model.train()
    layer = handles.sparse.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(4, 16)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    ref = reference(layer, x, dropout=layer.lora_dropout["default"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    model.eval()  # dropout inactive -> fused path, no dropout
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=0)


class _WeightSizedCasts(TorchDispatchMode):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and args[0].numel() == self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_dropout_path_under_autocast_matches_reference_and_casts_only_the_base():
    model, handles = sparse_peft(dropout=0.3)
    model.train()
    layer = handles.sparse.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(4, 16)
    with _WeightSizedCasts(layer.base_layer.weight.numel()) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        out = layer(x)
    torch.manual_seed(5)
    ref = reference(layer, x, dropout=layer.lora_dropout["default"])  # fp32, the same keep mask
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
    # The fp32 base weight is cast for the matmul (autocast); the masked delta is made in bf16 at
    # once, never as an fp32 weight-sized tensor cast afterwards, nor with a cast of the mask.
    assert casts.count == 1


def test_composes_with_nls_rank_mask():
    groups = [["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]
    _, handles = sparse_peft(neural_lora_search=True, target_module_groups=groups, search_space=["4,2", "4,3,1"])
    handles.nls.activate([2, 4, 4, 1])
    layer = handles.sparse.modules["model.layers.1.mlp.gate_proj"]
    x = torch.randn(3, 16)
    out, ref = layer(x), reference(layer, x, rank_mask=torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    for got, want in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # inactive ranks get no gradient
    # Merging under NLS uses the active sub-adapter too: delta = M * scaling * B[:, :1] @ A[:1].
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (b[:, :1] @ a[:1]) * layer.scaling["default"] * (layer.base_layer.weight != 0)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-6, rtol=0)


def test_disable_and_merge_states():
    model, handles = sparse_peft()
    layer = handles.sparse.modules["model.layers.0.self_attn.v_proj"]
    x = torch.randn(3, 16)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    fused = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), fused, atol=1e-5, rtol=0)
    assert torch.equal(layer.base_layer.weight == 0, ~getattr(layer, MASK_BUFFER))
    layer.unmerge()
    torch.testing.assert_close(layer(x), fused, atol=1e-5, rtol=0)


def test_training_then_merge_keeps_every_zero():
    model, handles = sparse_peft(dropout=0.1)
    base = {n: m.base_layer.weight.detach().clone() for n, m in handles.sparse.modules.items()}
    zeros_before = {n: w == 0 for n, w in base.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, zeros in zeros_before.items():
        weight = modules[name].weight
        assert type(modules[name]) is torch.nn.Linear
        assert torch.count_nonzero(weight[zeros]) == 0, name
        assert not torch.allclose(weight[~zeros], base[name][~zeros])  # the update reached the others
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    report = sparsity_report(merged, names=list(zeros_before))
    assert report["overall"] == pytest.approx(0.5, abs=0.01)


def test_remove_restores_stock_lora():
    _, handles = sparse_peft()
    layer = handles.sparse.modules["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 16)
    handles.sparse.remove()
    assert type(layer) is LoraLinear and not hasattr(layer, MASK_BUFFER)
    plain = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
    torch.testing.assert_close(layer(x), plain)


def test_sparsity_report_of_state_dict_and_model():
    model = sparse_tiny()
    by_model = sparsity_report(model)
    by_sd = sparsity_report(model.state_dict())
    assert by_model["layers"] == by_sd["layers"]
    assert len(by_model["layers"]) == 14 and "lm_head" not in by_model["layers"]
    assert by_model["overall"] == pytest.approx(0.5, abs=0.01)
    only_q = sparsity_report(model, names=["q_proj"])
    assert sorted(only_q["layers"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_decoder_made_casts_give_the_per_use_result_with_nls():
    groups = [["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]
    runs = []
    for clear_hooks in (False, True):
        torch.manual_seed(0)
        spaces = ["4,2", "4,3,1"]
        model, handles = sparse_peft(neural_lora_search=True, target_module_groups=groups, search_space=spaces)
        cast_frozen_linears(model, torch.bfloat16)  # leaves the sparse bases in fp32 (exact_base_weight)
        handles.nls.activate([2, 4, 4, 1])
        if clear_hooks:  # the reference: every layer casts A and B itself and masks B with its row
            base_of(model).get_decoder()._forward_pre_hooks.clear()
        ids = torch.randint(0, 128, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        used = adapter_weights(handles.sparse.modules["model.layers.0.self_attn.q_proj"], "default")
        assert (used is None) == clear_hooks and (clear_hooks or used.masked)
    (loss, grads), (ref_loss, ref_grads) = runs
    # One rounding apart: B*scale is made from the bf16 B here, from the fp32 B in the reference.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for name, ref in ref_grads.items():
        assert torch.nn.functional.cosine_similarity(grads[name].flatten(), ref.flatten(), dim=0) > 0.99, name
        assert torch.equal(grads[name] == 0, ref == 0), name  # the same ranks get no gradient
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert grads[key][2:].abs().max() == 0 and grads[key][:2].abs().max() > 0  # rank 2 of 4 in layer 0
