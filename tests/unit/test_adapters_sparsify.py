"""sparsify_model: magnitude / Wanda pruning, unstructured and N:M, of decoder linears only."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from sqft_service.adapters.sparsify import prunable_linears, sparsify_model
from tests.conftest import make_tiny_llama


def tiny(seed: int = 0) -> LlamaForCausalLM:
    return make_tiny_llama(128, seed, max_position_embeddings=64)


def test_magnitude_half_per_row():
    model = tiny()
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    before = {n: m.weight.clone() for n, m in prunable_linears(model).items()}
    report = sparsify_model(model, "magnitude", 0.5)
    assert len(report["layers"]) == 14
    assert all(frac == pytest.approx(0.5, abs=0.02) for frac in report["layers"].values())
    assert report["overall"] == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    for name, module in prunable_linears(model).items():
        w, orig = module.weight, before[name]
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
        # Kept weights are untouched, and every pruned one was no larger than the row's kept ones.
        kept = w != 0
        assert torch.equal(w[kept], orig[kept])
        for row in range(w.shape[0]):
            assert orig[row][~kept[row]].abs().max() <= orig[row][kept[row]].abs().min()


def test_two_four_pattern():
    model = tiny()
    report = sparsify_model(model, "magnitude", 0.0, pattern="2:4")
    assert report["sparsity"] == 0.5 and report["pattern"] == "2:4"
    for module in prunable_linears(model).values():
        groups = module.weight.reshape(module.weight.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()


def test_wanda_uses_calibration_norms():
    calib = [torch.randint(0, 128, (12,)) for _ in range(3)]
    # Skew the input norms: make the hidden states of feature 0 huge via the input layernorm gain.
    magnitude, wanda = tiny(), tiny()
    for model in (magnitude, wanda):
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[0] = 50.0
    m_rep = sparsify_model(magnitude, "magnitude", 0.5)
    w_rep = sparsify_model(wanda, "wanda", 0.5, calibration_input_ids=calib)
    assert w_rep["overall"] == pytest.approx(0.5, abs=0.01) and m_rep["overall"] == pytest.approx(0.5, abs=0.01)
    q_mag = magnitude.model.layers[0].self_attn.q_proj.weight
    q_wanda = wanda.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_mag == 0, q_wanda == 0)
    # With a 50x larger input norm, Wanda keeps feature 0's weights in every row.
    assert (q_wanda[:, 0] != 0).all() and (q_mag[:, 0] == 0).any()


def test_wanda_norms_batched_leave_the_padding_out():
    """Calibration samples of different lengths run right-padded together: the input norms (and so the
    masks) are those of one sample at a time, to float rounding; the pads count nowhere."""
    from sqft_service.adapters.sparsify import _input_norms

    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 128, (1, n), generator=gen) for n in (30, 5, 17, 30, 2)]
    model = tiny()
    layers = prunable_linears(model)
    alone = _input_norms(model, layers, calib, max_tokens=1)
    together = _input_norms(model, layers, calib, max_tokens=64)
    for name, norms in alone.items():
        assert torch.allclose(together[name], norms, rtol=1e-6), name
    # Without the mask the pads' rows would count: the norms would grow.
    padded = [torch.cat([c, torch.zeros(1, 30 - c.shape[1], dtype=c.dtype)], 1) for c in calib]
    grown = _input_norms(model, layers, padded, max_tokens=1)
    assert all((grown[n] > alone[n]).any() for n in alone)
    one, batched = tiny(), tiny()
    sparsify_model(one, "wanda", 0.5, calibration_input_ids=calib, batch_tokens=1)
    sparsify_model(batched, "wanda", 0.5, calibration_input_ids=calib)
    assert all(torch.equal(a == 0, b == 0) for a, b in zip(one.parameters(), batched.parameters(), strict=True))


def test_errors():
    with pytest.raises(ValueError, match="calibration_input_ids"):
        sparsify_model(tiny(), "wanda", 0.5)
    with pytest.raises(ValueError, match="unknown pruning method"):
        sparsify_model(tiny(), "random", 0.5)
    with pytest.raises(ValueError, match="'N:M'"):
        sparsify_model(tiny(), "magnitude", 0.5, pattern="2-4")
