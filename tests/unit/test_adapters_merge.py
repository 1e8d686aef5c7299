"""merge_adapter: dense and SparsePEFT merges saved as plain transformers checkpoints."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sqft_service.adapters.lora import build_peft_model
from sqft_service.adapters.merge import merge_adapter
from sqft_service.adapters.sparse import enable_sparse_peft
from sqft_service.adapters.sparsify import sparsify_model
from sqft_service.config import LoraSection
from tests.conftest import make_tiny_llama


def tiny(seed: int = 0, sparse: bool = False) -> LlamaForCausalLM:
    model = make_tiny_llama(128, seed, max_position_embeddings=64)
    if sparse:
        sparsify_model(model, "magnitude", 0.5)
    return model


@pytest.fixture
def saved(tmp_path):
    """A saved (sparse) base model and a trained-looking adapter for it."""

    def make(sparse: bool):
        base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
        tiny(sparse=sparse).save_pretrained(base_dir)
        lora = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, sparse_adapter=sparse)
        peft_model, _ = build_peft_model(tiny(sparse=sparse), lora)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        peft_model.save_pretrained(adapter_dir)
        return base_dir, adapter_dir

    return make


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dense_merge_matches_peft_model(saved, tmp_path):
    base_dir, adapter_dir = saved(False)
    out = tmp_path / "merged"
    report = merge_adapter(base_dir, adapter_dir, out, sparse=False)
    assert report["path"] == str(out) and report["adapted_modules"] == 14 and report["dtype"] == "float32"
    ids = torch.randint(0, 128, (2, 7))
    expected = logits(PeftModel.from_pretrained(tiny(), str(adapter_dir)).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged) is LlamaForCausalLM
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(tiny(), ids), expected, atol=1e-3)


def test_sparse_merge_keeps_zeros_and_matches_sparse_peft(saved, tmp_path):
    base_dir, adapter_dir = saved(True)
    out = tmp_path / "merged"
    report = merge_adapter(base_dir, adapter_dir, out, sparse=True)
    assert report["zeros_preserved"] is True
    assert report["before"]["adapted"]["layers"] == report["after"]["adapted"]["layers"]
    assert report["after"]["overall"] == pytest.approx(0.5, abs=0.01)
    ids = torch.randint(0, 128, (2, 7))
    reference = PeftModel.from_pretrained(tiny(sparse=True), str(adapter_dir)).eval()
    enable_sparse_peft(reference)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-5, rtol=0)
    base = tiny(sparse=True).state_dict()
    for key, value in merged.state_dict().items():
        if key.endswith("proj.weight"):
            assert torch.equal(value == 0, base[key] == 0), key
            assert not torch.equal(value, base[key])
    # The dense merge of the same adapter would fill the zeros in.
    dense = merge_adapter(base_dir, adapter_dir, tmp_path / "dense", sparse=False)
    assert dense["zeros_preserved"] is False and dense["after"]["overall"] < 0.01


def test_merge_is_idempotent_after_reload(saved, tmp_path):
    base_dir, adapter_dir = saved(True)
    merge_adapter(base_dir, adapter_dir, tmp_path / "m1", sparse=True)
    # Merging into an already loaded model (the GGUF path) gives bit-identical weights.
    merge_adapter(tiny(sparse=True), adapter_dir, tmp_path / "m2", sparse=True)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Re-applying the base mask to the merged weights changes nothing (zeros already kept).
    base = tiny(sparse=True).state_dict()
    for key, value in first.items():
        if key.endswith("proj.weight"):
            assert torch.equal(value * (base[key] != 0), value)


def test_merge_in_bfloat16_keeps_dtype(saved, tmp_path):
    base_dir, adapter_dir = saved(False)
    report = merge_adapter(base_dir, adapter_dir, tmp_path / "bf16", sparse=False, dtype=torch.bfloat16)
    assert report["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
