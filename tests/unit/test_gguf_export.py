"""GGUF export: GGML blocks that hold a QA layer's integers exactly, and SmolLM2 written back to GGUF
and read by stock transformers (its GGUF loader de-quantizes with the ``gguf`` package, as llama.cpp does)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from bench.tiny_llama import make_tiny_causal_lm

from sqft_service.adapters.qa.quantizer import GroupQuantizer
from sqft_service.gguf_export import GGUFExportError, copy_fields, export_gguf, int_blocks
from sqft_service.model_sources import source_gguf
from sqft_service.training.models import convert_gguf


def _sparse_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[w.abs() < w.abs().median()] = 0.0
    w[0, :64] = 0.0  # a group of zeros
    w[1, :64] = w[1, :64].abs() + 1e-3  # an all-positive group (its range widened to hold 0)
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int_blocks_decode_to_the_quantized_weight_bit_for_bit(bits, group_size):
    w = _sparse_weight(8, 256, seed=bits)
    q = GroupQuantizer.fit(w, bits, group_size)
    codes = q.codes(w)
    data, qtype = int_blocks(codes.numpy(), q.scale.numpy(), q.zero.numpy(), bits)
    expected = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1", 6: "Q8_0", 7: "Q8_0"}[bits]
    assert qtype.name == expected
    block_bytes = {"Q4_1": 20, "Q5_1": 24, "Q8_0": 34}[expected]
    assert data.shape == (8, 256 // 32 * block_bytes)
    decoded = gguf.quants.dequantize(data, qtype).reshape(w.shape)
    assert np.array_equal(decoded, q.dequantize(codes).numpy())  # GGML's d*q + m, exactly
    assert (decoded[w.numpy() == 0] == 0).all()  # zeros stay zeros


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_quantizer_scales_are_float16_exact(bits):
    q = GroupQuantizer.fit(_sparse_weight(16, 128, seed=3) * 1e-2, bits, 32)  # small weights: low exponents
    assert torch.equal(q.scale.half().float(), q.scale)
    if bits <= 5:
        assert torch.equal((-q.scale * q.zero).half().float(), -q.scale * q.zero)


def test_source_gguf_follows_sparsify_reports(tmp_path, gguf_path):
    assert source_gguf(str(gguf_path)) == gguf_path
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (sparse / "sparsity_report.json").write_text(json.dumps({"source_model": str(gguf_path)}))
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "sparsity_report.json").write_text(json.dumps({"source_model": str(sparse)}))
    assert source_gguf(str(twice)) == gguf_path
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "sparsity_report.json").write_text(json.dumps({"source_model": str(loop)}))
    assert source_gguf(str(loop)) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sparsity_report.json").write_text("[1")
    assert source_gguf(str(tmp_path / "broken")) is None
    assert source_gguf(str(tmp_path)) is None  # a plain model directory
    assert source_gguf(str(tmp_path / "gone.gguf")) is None


@pytest.fixture(scope="module")
def smollm2_qa(gguf_cache, gguf_path):
    """SmolLM2 de-quantized, with some layers pruned and put on a QA grid as a QA-SparsePEFT merge leaves them:
    4-bit q/k (llama.cpp permutes their rows), 5-bit up, 7-bit down, an 8-bit o and a k in groups of 16
    (those two kept as floats)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(convert_gguf(gguf_path, gguf_cache), dtype=torch.float32)
    bits = {"self_attn.q_proj": 4, "self_attn.k_proj": 4, "mlp.up_proj": 5, "mlp.down_proj": 7, "self_attn.o_proj": 8}
    quantizers = {}
    with torch.no_grad():
        for layer in (1, 7):
            for suffix, b in bits.items():
                name = f"model.layers.{layer}.{suffix}"
                module = model.get_submodule(name)
                w = module.weight
                w[w.abs() < w.abs().median()] = 0.0
                quantizers[name] = q = GroupQuantizer.fit(w, b, 64)
                w.copy_(q.dequantize(q.codes(w)))
        # Groups of 16: no GGML block fits them, so the layer goes as exact floats (rows still permuted).
        w = model.get_submodule("model.layers.4.self_attn.k_proj").weight
        quantizers["model.layers.4.self_attn.k_proj"] = q = GroupQuantizer.fit(w, 4, 16)
        w.copy_(q.dequantize(q.codes(w)))
    return model, quantizers


def test_smollm2_with_qa_layers_round_trips_through_transformers(tmp_path, gguf_path, smollm2_qa):
    from transformers import AutoModelForCausalLM

    model, quantizers = smollm2_qa
    report = export_gguf(model, gguf_path, tmp_path / "model.gguf", "f32", quantizers)
    assert report["int_layers"] == report["exact_int_layers"] == len(quantizers)
    assert report["tensor_types"]["Q4_1"] == 4 and report["tensor_types"]["Q5_1"] == 2
    assert report["tensor_types"]["Q8_0"] == 2  # 7-bit codes as q - z
    assert report["tensor_types"]["F32"] == 272 - 4 - 2 - 2  # the rest of 272: norms, weights, 8 bits, g16
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # every weight, the QA integers included
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    source = gguf.GGUFReader(str(gguf_path))
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "llama.rope.freq_base", "general.name"):
        assert reader.get_field(key).contents() == source.get_field(key).contents(), key
    assert reader.get_field("tokenizer.ggml.tokens").contents() == source.get_field("tokenizer.ggml.tokens").contents()
    assert [t.name for t in reader.tensors] == [t.name for t in source.tensors]


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])  # 4 and 5 bits: test_gguf_hf.py
def test_other_weights_take_the_requested_type(tmp_path, gguf_path, smollm2_qa, out_type):
    model, quantizers = smollm2_qa
    path = tmp_path / "model.gguf"
    report = export_gguf(model, gguf_path, path, out_type, quantizers)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    assert by_name["token_embd.weight"].tensor_type.name == expected
    assert by_name["blk.0.attn_v.weight"].tensor_type.name == expected
    assert by_name["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay F32
    assert by_name["blk.1.attn_q.weight"].tensor_type.name == "Q4_1"  # QA layers keep their integers
    assert report["exact_int_layers"] == len(quantizers)
    file_type = int(reader.get_field("general.file_type").contents())
    assert file_type == {"f16": 1, "bf16": 32, "q8_0": 7}[out_type]
    embed = gguf.quants.dequantize(by_name["token_embd.weight"].data, by_name["token_embd.weight"].tensor_type)
    reference = model.model.embed_tokens.weight.detach().numpy()
    tolerance = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[out_type]  # relative to the weights' scale
    assert np.abs(embed - reference).max() <= tolerance * np.abs(reference).max()


def test_a_model_that_does_not_match_the_base_is_refused(tmp_path, gguf_path, tiny_llama):
    with pytest.raises(GGUFExportError, match="differs from the base GGUF"):
        export_gguf(tiny_llama, gguf_path, tmp_path / "model.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_gguf(tiny_llama, gguf_path, tmp_path / "model.gguf", "q4_k")


def test_only_architectures_we_write_are_accepted(tmp_path, tiny_llama):
    path = Path(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFExportError, match="'gpt2'"):
        export_gguf(tiny_llama, path, tmp_path / "model.gguf")


def test_cli_merges_a_lora_adapter_into_a_gguf(tmp_path, gguf_path, gguf_cache):
    """``sqft merge --gguf q8_0`` on a plain LoRA adapter of the GGUF: the merged weights, in Q8_0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sqft_service.cli import main
    from tests.conftest import randomize_b

    base_dir = convert_gguf(gguf_path, gguf_cache)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    randomize_b(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(gguf_path), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]
    assert (
        main([*argv, "--gguf", "q8_0", "--model-cache", str(gguf_cache), "--json-out", str(tmp_path / "r.json")]) == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())["gguf"]
    assert report["path"] == str((out / "model.gguf").resolve()) and report["int_layers"] == 0
    assert report["tensor_types"] == {"Q8_0": 211, "F32": 61}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    by_name = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    q = gguf.quants.dequantize(by_name["blk.3.attn_v.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    v = merged.model.layers[3].self_attn.v_proj.weight.detach().numpy()
    assert not np.allclose(
        v, AutoModelForCausalLM.from_pretrained(base_dir).model.layers[3].self_attn.v_proj.weight.detach().numpy()
    )
    assert np.abs(q - v).max() <= np.abs(v).max() / 127  # the merged weight, to Q8_0's step


def _tiny_qwen2_gguf(path: Path, tokenizer_gguf: Path):
    """A random 2-layer Qwen2 written as an F32 GGUF with SmolLM2's tokenizer: a base of another
    architecture (q/k/v biases, q/k rows not permuted). transformers loads it as the same model (checked
    here); llama.cpp gave the same logits (bench machine, llama-cpp-python 0.3.36, max diff 2e-4)."""
    model = make_tiny_causal_lm("qwen2", 49152, hidden_size=64, intermediate_size=128)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    copy_fields(gguf.GGUFReader(str(tokenizer_gguf)), writer, lambda name: name.startswith("tokenizer."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    for key, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_a_qwen2_merge_round_trips_too(tmp_path, gguf_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base" / "qwen2.gguf"
    base.parent.mkdir()
    model = _tiny_qwen2_gguf(base, gguf_path)
    loaded_base = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name, dtype=torch.float32)
    assert type(loaded_base).__name__ == "Qwen2ForCausalLM"
    assert all(torch.equal(v, loaded_base.state_dict()[k]) for k, v in model.state_dict().items())
    quantizers = {}
    with torch.no_grad():  # QA layers with biases beside them (q, k) and without (down)
        for name in (
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.mlp.down_proj",
        ):
            w = model.get_submodule(name).weight
            w[w.abs() < w.abs().median()] = 0.0
            quantizers[name] = q = GroupQuantizer.fit(w, 4, 32)
            w.copy_(q.dequantize(q.codes(w)))
    out = tmp_path / "out"
    out.mkdir()
    report = export_gguf(model, base, out / "model.gguf", "f32", quantizers)
    assert report["int_layers"] == report["exact_int_layers"] == 3 and report["tensor_types"]["Q4_1"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
