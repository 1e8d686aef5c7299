"""GPTQ of a sparse base (adapters/qa/gptq.py) and QA-SparsePEFT trained and merged on it."""

from __future__ import annotations

import pytest
import torch
from bench.tiny_llama import make_tiny_llama

from sqft_service.adapters.lora import AdapterConfigError, build_peft_model
from sqft_service.adapters.merge import merge_adapter
from sqft_service.adapters.qa import QUANTIZED_BASE_FILE, GroupQuantizer, load_int_weights, quantized_base_of
from sqft_service.adapters.qa.gptq import gptq_quantize_, gptq_weight
from sqft_service.adapters.sparsify import prunable_linears, sparsify_model
from sqft_service.config import LoraSection
from sqft_service.errors import InvalidConfigurationError
from sqft_service.model_ops import sparsify
from sqft_service.training.models import load_base_model
from tests.conftest import randomize_b

SHAPE = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=64)
GROUP = 16
BITS = 2  # the fixture base: coarse enough that some kept weights round to 0


def _samples(vocab: int, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, 48), generator=gen) for _ in range(n)]


def _sparse_model():
    model = make_tiny_llama(128, 0, **SHAPE)
    sparsify_model(model, "magnitude", 0.5)
    return model


def test_gptq_rounds_exactly_to_its_float_weights_keeps_the_zeros_and_beats_rtn():
    model = _sparse_model()
    pruned = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    results = gptq_quantize_(model, prunable_linears(model), _samples(128, 24, 1), 4, GROUP)
    assert set(results) == set(pruned)
    for name, linear in prunable_linears(model).items():
        r = results[name]
        # The model holds Q(W~), bit for bit, and every pruned weight is exactly 0 in W~ and in Q(W~).
        assert torch.equal(r.quantizer.fake_quantize(r.float_weight), linear.weight), name
        assert torch.equal(r.float_weight == 0, pruned[name] == 0), name
        assert (linear.weight[pruned[name] == 0] == 0).all(), name
        assert torch.equal(r.quantizer.dequantize(r.quantizer.codes(linear.weight)), linear.weight), name
    assert sum(r.error for r in results.values()) < 0.9 * sum(r.rtn_error for r in results.values())
    rtn = _sparse_model()
    for linear in prunable_linears(rtn).values():
        linear.weight.data = GroupQuantizer.fit(linear.weight, 4, GROUP).fake_quantize(linear.weight)
    with torch.no_grad():
        gptq_drift = (model(input_ids=ids).logits - reference).pow(2).mean()
        rtn_drift = (rtn(input_ids=ids).logits - reference).pow(2).mean()
    assert gptq_drift < rtn_drift


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest():
    # H = I: the inverse Hessian has no off-diagonal term, so no error is spread and GPTQ rounds as RTN.
    weight = torch.randn(8, 32)
    weight[weight.abs() < 0.3] = 0
    result = gptq_weight(weight, torch.eye(32), 4, GROUP)
    rtn = GroupQuantizer.fit(weight, 4, GROUP)
    assert torch.equal(result.quantizer.fake_quantize(result.float_weight), rtn.fake_quantize(weight))
    assert result.error == pytest.approx(result.rtn_error)


def test_linears_fed_one_input_share_its_hessian_and_are_quantized_as_if_alone():
    """q, k, v (and gate, up) see one tensor: one Hessian, one stacked GPTQ, each row as it would be alone."""
    from sqft_service.adapters.qa.gptq import _decoder_layers, _first_layer_inputs, _hessians, gptq_weights

    model = _sparse_model()
    (layer, members), _ = _decoder_layers(model, prunable_linears(model))
    calls = _first_layer_inputs(model, layer, _samples(128, 4, 2))
    hessians, fed = _hessians(layer, members, calls)
    prefix = "model.layers.0."
    groups = sorted(sorted(n.removeprefix(prefix) for n in names) for names in fed.values())
    assert groups == [
        ["mlp.down_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
    ]
    first = next(first for first, names in fed.items() if len(names) == 3)
    weights = [members[name].weight for name in fed[first]]
    together = gptq_weights(weights, hessians[first], 4, GROUP)
    for weight, result in zip(weights, together, strict=True):
        alone = gptq_weight(weight, hessians[first], 4, GROUP)
        assert torch.equal(result.float_weight, alone.float_weight)
        assert torch.equal(result.quantizer.scale, alone.quantizer.scale)
        assert torch.equal(result.quantizer.zero, alone.quantizer.zero)
        assert result.error == pytest.approx(alone.error) and result.rtn_error == alone.rtn_error


def test_calibration_batches_pad_on_the_right_and_leave_the_pads_out():
    """Samples of different lengths run together, right-padded: every layer's Hessians and the quantized
    model are those of one sample at a time (to float rounding), the pads counted nowhere."""
    from sqft_service.adapters.calibration import calibration_batches
    from sqft_service.adapters.qa.gptq import _decoder_layers, _first_layer_inputs, _hessians

    gen = torch.Generator().manual_seed(3)
    samples = [torch.randint(3, 128, (1, n), generator=gen) for n in (48, 9, 31, 48, 17, 2, 40)]
    batches = calibration_batches(samples, max_tokens=100)
    assert [tuple(ids.shape) for ids, _ in batches] == [(2, 48), (2, 40), (3, 17)]  # longest first
    assert sum(int(real.sum()) for _, real in batches) == sum(s.numel() for s in samples)
    with pytest.raises(ValueError, match="one sequence each"):
        calibration_batches([torch.zeros(2, 5, dtype=torch.long)], max_tokens=100)
    model = _sparse_model()
    (layer, members), _ = _decoder_layers(model, prunable_linears(model))
    alone, _ = _hessians(layer, members, _first_layer_inputs(model, layer, samples, max_tokens=1))
    together, _ = _hessians(layer, members, _first_layer_inputs(model, layer, samples, max_tokens=100))
    assert alone.keys() == together.keys()
    for name, hessian in alone.items():
        assert torch.allclose(together[name], hessian, rtol=1e-4, atol=1e-3), name
    one, batched = _sparse_model(), _sparse_model()
    gptq_quantize_(one, prunable_linears(one), samples, 4, GROUP, batch_tokens=1)
    gptq_quantize_(batched, prunable_linears(batched), samples, 4, GROUP, batch_tokens=100)
    changed = [(a - b).abs().max() for a, b in zip(one.parameters(), batched.parameters(), strict=True)]
    # A weight on a rounding boundary may take the neighbouring code: at most one step (16 at 4 bits).
    step = max(w.abs().max() for w in one.parameters()) / 7
    assert max(changed) <= step and sum(bool(c > 0) for c in changed) <= 2


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tokenizer_dir):
    """A saved tiny Llama pruned by Wanda and quantized by GPTQ through ``model_ops.sparsify``."""
    from transformers import AutoTokenizer

    source = tmp_path_factory.mktemp("dense")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    make_tiny_llama(len(tokenizer), 0, **SHAPE).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path_factory.mktemp("gptq") / "model"
    done: list[tuple[int, int]] = []
    report = sparsify(
        str(source),
        out,
        method="wanda",
        quantization={"method": "gptq", "bits": BITS, "group_size": GROUP},
        progress=lambda *step: done.append(step),
    )
    assert done == [(1, 2), (2, 2)]
    quantization = report["quantization"]
    assert quantization["layers"] == 14 and quantization["output_error"] < quantization["rtn_output_error"]
    assert quantization["overall_zeros_after_rounding"] >= report["report"]["overall"]
    assert (out / QUANTIZED_BASE_FILE).is_file()
    return out


def _qa(bits: int = BITS, group: int = GROUP) -> LoraSection:
    return LoraSection(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        sparse_adapter=True,
        quantization_aware=True,
        quantization_bits=bits,
        quantization_group_size=group,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )


def test_qa_on_a_gptq_base_starts_from_it_trains_the_pruning_mask_and_merges_to_its_integers(gptq_dir, tmp_path):
    base = load_base_model(str(gptq_dir))
    gptq = quantized_base_of(base)
    assert gptq is not None and (gptq.bits, gptq.group_size) == (BITS, GROUP)
    loaded = {name: m.weight.detach().clone() for name, m in prunable_linears(base).items()}
    model, handles = build_peft_model(base, _qa(), seed=0)
    adapted = handles.quant.modules
    assert len(adapted) == 6
    for name, layer in adapted.items():
        w_tilde = gptq.float_weight(name)
        assert torch.equal(layer.get_base_layer().weight, w_tilde), name  # trained from W~ ...
        assert torch.equal(layer.quantized_weight(["default"]), loaded[name]), name  # ... which starts as the base
        assert torch.equal(layer.quantizer.scale, gptq.quantizer(name).scale), name
        # The mask is the pruning's: weights that round to 0 in the INT base stay trainable.
        assert torch.equal(handles.sparse.masks[name].bool(), w_tilde != 0), name
    assert any(((gptq.float_weight(n) != 0) & (loaded[n] == 0)).any() for n in adapted)  # such weights exist
    randomize_b(model, seed=3)
    for p in model.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:
            p.data.mul_(0.02)
    trained = {name: layer.quantized_weight(["default"]).detach().clone() for name, layer in adapted.items()}
    assert any(not torch.equal(trained[n], loaded[n]) for n in trained)  # the update moved codes
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    handles.quant.save(adapter_dir)
    report = merge_adapter(str(gptq_dir), adapter_dir, tmp_path / "merged", sparse=True)
    assert report["zeros_preserved"] is True
    assert report["quantization"] == {
        "bits": BITS,
        "group_size": GROUP,
        "layers": 14,
        "base": "gptq",
        "int_weights": "sqft_int_weights.safetensors",
    }
    ints = load_int_weights(tmp_path / "merged")
    assert set(ints) == set(loaded)  # every GPTQ layer is written as integers, adapted or not
    for name, weight in ints.items():
        assert torch.equal(weight, trained.get(name, loaded[name])), name


def test_qa_settings_that_differ_from_the_gptq_base_are_refused_naming_them(gptq_dir):
    for lora, param in ((_qa(bits=8), "quantization_bits"), (_qa(group=8), "quantization_group_size")):
        with pytest.raises(AdapterConfigError) as caught:
            build_peft_model(load_base_model(str(gptq_dir)), lora, seed=0)
        assert caught.value.param == f"General.lora_config.{param}"
        assert "2 bits in groups of 16" in str(caught.value)


def test_a_group_size_that_does_not_fit_the_model_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidConfigurationError) as caught:
        sparsify(str(tiny_model_dir), tmp_path / "out", quantization={"method": "gptq", "bits": 4, "group_size": 24})
    assert caught.value.param == "quantization.group_size" and "16, 32" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_quantizes_after_pruning_and_names_its_flags_on_bad_input(tiny_model_dir, tmp_path, capsys):
    from sqft_service.cli import main

    out = tmp_path / "gptq"
    argv = ["sparsify", "--model", str(tiny_model_dir), "--output", str(out), "--gptq-bits", "3"]
    assert main([*argv, "--gptq-group-size", "16"]) == 0
    base = load_base_model(str(out))
    assert (quantized_base_of(base).bits, quantized_base_of(base).group_size) == (3, 16)
    assert main([*argv, "--gptq-group-size", "12"]) == 2
    assert "--gptq-group-size" in capsys.readouterr().err
