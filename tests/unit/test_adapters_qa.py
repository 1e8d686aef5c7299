"""QA-SparsePEFT: the group quantizer, training through it, and a merge that is the trained integers."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sqft_service.adapters.lora import AdapterConfigError, build_peft_model
from sqft_service.adapters.merge import merge_adapter
from sqft_service.adapters.nls.config import write_elastic_adapter_config
from sqft_service.adapters.nls.extract import extract_sub_adapter
from sqft_service.adapters.qa import (
    INT_WEIGHTS_FILE,
    QUANT_FILE,
    GroupQuantizer,
    QuantAwareSparseLoraLinear,
    load_int_weights,
    saved_quantizers,
)
from sqft_service.adapters.qa.quantizer import pack_codes, unpack_codes
from sqft_service.adapters.sparse import MASK_BUFFER
from sqft_service.adapters.sparsify import sparsify_model
from sqft_service.config import LoraSection
from tests.conftest import make_tiny_llama, randomize_b

QA = dict(sparse_adapter=True, quantization_aware=True, lora_dropout=0.0, quantization_group_size=8)


def sparse_tiny(seed: int = 0) -> LlamaForCausalLM:
    model = make_tiny_llama(128, seed, max_position_embeddings=64)
    sparsify_model(model, "magnitude", 0.5)
    return model


def qa_peft(bits: int = 4, **extra):
    lora = LoraSection(r=4, lora_alpha=8, quantization_bits=bits, **{**QA, **extra})
    base = sparse_tiny()
    zeros = {n: m.weight.detach() == 0 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model, handles = build_peft_model(base, lora, seed=0)
    randomize_b(model, seed=3)
    for p in model.parameters():  # B x 0.05: updates of a size that moves some codes, not all
        if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:
            p.data.mul_(0.05)
    return model, handles, zeros


def on_grid(weight: torch.Tensor, q: GroupQuantizer) -> bool:
    return torch.equal(q.dequantize(q.codes(weight)), weight.float())


# ------------------------------------------------------------------ quantizer
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_grid_holds_zero_and_is_idempotent(bits):
    w = torch.randn(6, 32)
    w[w.abs() < 0.5] = 0.0
    w[0, :8] = 0.0  # a group of zeros: scale 1, code z
    w[1, 8:16] = w[1, 8:16].abs() + 0.1  # an all-positive group: its range is widened to 0
    q = GroupQuantizer.fit(w, bits, 8)
    codes = q.codes(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert torch.equal(q.zero, q.zero.round()) and (q.zero >= 0).all() and (q.zero <= 2**bits - 1).all()
    fq = q.fake_quantize(w)
    assert (fq[w == 0] == 0).all()  # every zero comes back exactly
    assert torch.equal(q.fake_quantize(fq), fq)  # a weight on the grid stays put
    assert (fq - w).abs().max() <= q.scale.max() / 2 + 1e-6
    assert on_grid(fq, q)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)
    if bits == 4:
        assert pack_codes(codes, 4).shape == (6, 16)


def test_quantizer_refuses_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        GroupQuantizer.fit(torch.randn(4, 20), 4, 8)


def test_straight_through_gradient_stops_outside_the_range():
    w = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.2, -0.3, 0.7, -0.9]])
    q = GroupQuantizer.fit(w, 4, 8)
    moved = (w + torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, -5.0, 0.0, 0.0]])).requires_grad_()
    out = q.fake_quantize(moved)
    (grad,) = torch.autograd.grad(out.sum(), moved)
    assert torch.equal(grad, torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]]))
    s, z = float(q.scale), float(q.zero)
    assert out[0, 1] == (15 - z) * s and out[0, 5] == -z * s  # clamped to the group's last codes


# ------------------------------------------------------------------ training layer
def test_layers_start_as_the_quantized_base_and_keep_its_zeros():
    model, handles, zeros = qa_peft()
    assert handles.quant is not None and handles.sparse is handles.quant.sparse
    assert len(handles.quant.modules) == 14
    fresh = dict(sparse_tiny().named_modules())
    x = torch.randn(3, 32)
    for name, layer in handles.quant.modules.items():
        assert isinstance(layer, QuantAwareSparseLoraLinear)
        w = layer.get_base_layer().weight
        assert torch.equal(w, fresh[name].weight)  # the float base is kept: the sum is taken on it
        assert torch.equal(getattr(layer, MASK_BUFFER), zeros[name].logical_not())
        layer.lora_B["default"].weight.data.zero_()  # B = 0, as a job starts
        quantized = layer.quantizer.fake_quantize(w)
        assert not torch.equal(quantized, w) and (quantized[zeros[name]] == 0).all()
        inputs = x[:, : w.shape[1]]
        assert torch.equal(layer(inputs), torch.nn.functional.linear(inputs, quantized)), name
    assert not any("sqft_quant" in k for k in model.state_dict())  # the adapter checkpoint stays stock peft


def test_forward_is_the_quantized_merged_weight_and_gradients_reach_the_adapter():
    _model, handles, _ = qa_peft()
    layer = handles.quant.modules["model.layers.1.mlp.down_proj"]
    x = torch.randn(2, 5, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = layer.get_base_layer().weight
    expected = layer.quantizer.fake_quantize(w + (b @ a) * layer.scaling["default"] * (w != 0))
    out = layer(x)
    torch.testing.assert_close(out, x @ expected.T, atol=1e-6, rtol=0)
    assert not torch.equal(expected, w)  # the adapter moved some codes
    ga, gb = torch.autograd.grad(out.square().sum(), (a, b))
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def _train(model, steps: int = 15) -> list[float]:
    model.train()
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_autocast_trains_with_the_integers_the_merge_stores():
    _, handles, _ = qa_peft()
    for layer in handles.quant.modules.values():
        with torch.no_grad():
            plain = layer.quantized_weight(["default"])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under_autocast = layer.quantized_weight(["default"])
        assert torch.equal(under_autocast, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, layer.in_features))
    assert out.dtype == torch.bfloat16  # the matmul itself runs in the autocast dtype


def test_training_through_the_quantizer_lowers_the_loss():
    """From peft's B = 0, as a job starts, with updates small against the weights (as LoRA's are).

    The quantizer's range is fixed, so an update pushing a group's extreme weight outward clamps and gets
    no gradient: QA learns somewhat slower than SparsePEFT, but it learns."""
    drops = {}
    for name, extra in (
        ("sparse", {"sparse_adapter": True}),
        ("qa4", {**QA, "quantization_group_size": 16}),
        ("qa8", {**QA, "quantization_bits": 8, "quantization_group_size": 16}),
    ):
        model, _ = build_peft_model(
            sparse_tiny(), LoraSection(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **extra}), seed=0
        )
        losses = _train(model)
        assert losses[-1] < losses[0], (name, losses)
        drops[name] = losses[0] - losses[-1]
    assert drops["qa4"] > 0.5 * drops["sparse"] and drops["qa8"] > 0.5 * drops["sparse"], drops


# ------------------------------------------------------------------ merge
def test_merge_stores_the_trained_integers_and_stock_transformers_loads_them(tmp_path):
    model, handles, zeros = qa_peft()
    model.eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    handles.quant.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / QUANT_FILE).is_file()
    base_dir = tmp_path / "base"
    sparse_tiny().save_pretrained(base_dir)

    report = merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", sparse=False)
    assert report["sparse"] is True and report["zeros_preserved"] is True and report["dtype"] == "float32"
    assert report["quantization"] == {"bits": 4, "group_size": 8, "layers": 14, "int_weights": INT_WEIGHTS_FILE}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # stock transformers
    with torch.no_grad():
        served = merged(input_ids=ids).logits
    assert torch.equal(served, trained)  # what trained is what is deployed, to the bit
    ints = load_int_weights(tmp_path / "merged")
    quantizers = saved_quantizers(tmp_path / "adapter")
    modules = dict(merged.named_modules())
    assert sorted(ints) == sorted(quantizers) == sorted(handles.quant.modules)
    for name, weight in ints.items():
        assert torch.equal(weight, modules[name].weight), name  # the INT file is the model's weights
        assert (weight[zeros[name]] == 0).all()  # as sparse as the base
        assert on_grid(modules[name].weight, quantizers[name])


def test_a_merged_layer_refuses_to_act_as_its_base():
    model, handles, _ = qa_peft()
    layer = handles.quant.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.equal(layer(x), before)  # merged: the same integers
        with model.disable_adapter(), pytest.raises(ValueError, match="can't be undone"):
            layer(x)


def test_quantizing_after_a_plain_sparse_merge_is_not_what_trained(tmp_path):
    """Why QA: RTN-quantizing a SparsePEFT merge changes the outputs; a QA merge does not."""
    model, _handles, _ = qa_peft()
    model.eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=ids).logits, trained)
    plain, _ = build_peft_model(sparse_tiny(), LoraSection(r=4, lora_alpha=8, sparse_adapter=True), seed=0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    post = plain.merge_and_unload()
    with torch.no_grad():
        for module in post.modules():
            if (
                isinstance(module, torch.nn.Linear)
                and module.weight.shape[1] % 8 == 0
                and module.weight.shape[0] != 128
            ):
                module.weight.copy_(GroupQuantizer.fit(module.weight, 4, 8).fake_quantize(module.weight))
        assert not torch.allclose(post(input_ids=ids).logits, trained, atol=1e-4)


def test_nls_sub_adapter_carries_the_quantizers(tmp_path):
    groups = [["q_proj", "k_proj", "v_proj"], ["up_proj", "down_proj"]]
    lora = LoraSection(
        r=4, lora_alpha=8, neural_lora_search=True, target_module_groups=groups, search_space=["4,2", "4,2"], **QA
    )
    model, handles = build_peft_model(sparse_tiny(), lora, seed=0)
    randomize_b(model, seed=4)
    model.save_pretrained(tmp_path / "super")
    write_elastic_adapter_config(handles.nls, lora, tmp_path / "super")
    handles.quant.save(tmp_path / "super")
    extract_sub_adapter(tmp_path / "super", tmp_path / "sub", [2, 2, 2, 2])
    assert (tmp_path / "sub" / QUANT_FILE).read_bytes() == (tmp_path / "super" / QUANT_FILE).read_bytes()
    base_dir = tmp_path / "base"
    sparse_tiny().save_pretrained(base_dir)
    report = merge_adapter(base_dir, tmp_path / "sub", tmp_path / "merged", sparse=True)
    assert report["zeros_preserved"] and report["quantization"]["layers"] == 10
    ints = load_int_weights(tmp_path / "merged")
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_modules())
    assert all(torch.equal(w, merged[n].weight) for n, w in ints.items())


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"quantization_aware": True}, "sparse_adapter"),
        ({"quantization_aware": True, "sparse_adapter": True}, "lora_dropout"),
        ({"quantization_bits": 8}, "quantization_bits"),
        ({"quantization_group_size": 32, "sparse_adapter": True}, "quantization_group_size"),
        ({"quantization_group_size": 64, "quantization_bits": 3}, "quantization_bits"),
        ({**QA, "quantization_bits": 9}, "quantization_bits"),
        ({**QA, "quantization_group_size": 12}, "quantization_group_size"),
    ],
)
def test_bad_quantization_settings_name_the_field(fields, named):
    with pytest.raises(ValidationError) as info:
        LoraSection(**fields)
    assert named in json.dumps(info.value.errors(include_url=False), default=str)


def test_a_group_size_the_layers_do_not_divide_names_the_field():
    lora = LoraSection(**{**QA, "quantization_group_size": 24})
    with pytest.raises(AdapterConfigError) as info:
        build_peft_model(sparse_tiny(), lora, seed=0)
    assert info.value.param == "General.lora_config.quantization_group_size"
    assert "does not divide the 16 inputs" in str(info.value)
