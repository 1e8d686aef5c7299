"""GGUF export of a merge whose base is a plain model directory: the settings and tokenizer llama.cpp's
converter would derive, checked against the SmolLM2 GGUF that converter wrote, and read back by stock
transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from bench.hub_tokenizers import GPT4O_PRE, LLAMA3_PRE, QWEN2_PRE, SMOLLM_PRE, sentencepiece_tokenizer
from bench.tiny_llama import make_tiny_causal_lm
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from sqft_service.gguf_export import GGUFExportError, export_gguf
from sqft_service.gguf_hf import check_source
from sqft_service.gguf_tokenizer import pre_tokenizer_name
from sqft_service.model_sources import export_source, hf_export_dir
from sqft_service.training.models import ModelLoadError, convert_gguf


def _with_pre(pre: dict | None) -> Tokenizer:
    data = json.loads(Tokenizer(models.BPE()).to_str())
    data["pre_tokenizer"] = pre
    return Tokenizer.from_str(json.dumps(data))


def test_pre_tokenizers_are_named_by_how_they_split():
    assert pre_tokenizer_name(_with_pre(LLAMA3_PRE)) == "llama-bpe"
    assert pre_tokenizer_name(_with_pre(QWEN2_PRE)) == "qwen2"
    assert pre_tokenizer_name(_with_pre(SMOLLM_PRE)) == "smollm"
    assert pre_tokenizer_name(_with_pre(GPT4O_PRE)) == "gpt-4o"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(_with_pre(gpt2)) == "gpt-2"
    # Llama 3's split with digit runs of two: llama.cpp implements no such pre-tokenizer.
    other = json.loads(json.dumps(LLAMA3_PRE).replace("{1,3}", "{1,2}"))
    for pre in (other, {"type": "Whitespace"}, None):
        with pytest.raises(GGUFExportError, match="pre-tokenizer"):
            pre_tokenizer_name(_with_pre(pre))
    splitter = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
    with pytest.raises(GGUFExportError):
        pre_tokenizer_name(_with_tokenizer_pre(splitter))


def _with_tokenizer_pre(pre: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return tok


@pytest.fixture(scope="module")
def smollm2_dir(gguf_path, gguf_cache) -> Path:
    """SmolLM2 as a plain model directory (transformers' conversion of the GGUF)."""
    return convert_gguf(gguf_path, gguf_cache)


def _metadata_dir(model_dir: Path, into: Path, pre: dict | None = None) -> Path:
    """The small files of ``model_dir`` (no weights), the tokenizer's pre-tokenizer replaced by ``pre``."""
    into.mkdir()
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, into / path.name)
    if pre is not None:
        data = json.loads((into / "tokenizer.json").read_text())
        data["pre_tokenizer"] = pre
        (into / "tokenizer.json").write_text(json.dumps(data))
    return into


def _fields(reader: gguf.GGUFReader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def test_a_model_directory_exports_what_llamacpp_converter_wrote(tmp_path, gguf_path, smollm2_dir):
    """The directory with SmolLM2's hub pre-tokenizer gives the settings and the whole tokenizer (tokens,
    types, merges, special ids, add_bos, chat template, "smollm") that llama.cpp's converter wrote into the
    published GGUF, and its tensors; only the file's descriptive ``general.*`` fields are not derived. (The
    weights are written as for a GGUF base: ``test_gguf_export.py`` and ``tests/integration`` read them back.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    source = _metadata_dir(smollm2_dir, tmp_path / "SmolLM2-hub", SMOLLM_PRE)
    assert export_source(str(source)) == source
    out = tmp_path / "model.gguf"
    report = export_gguf(model, source, out, "f16")
    assert report["tensor_types"] == {"F16": 1 + 7 * 30, "F32": 1 + 2 * 30}  # the head is tied: no output
    ours_file, published_file = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(gguf_path))  # 4 s each
    ours, published = _fields(ours_file), _fields(published_file)
    descriptive = {k for k in published if k.startswith("general.")} - {"general.architecture"}
    assert {k: v for k, v in published.items() if k not in descriptive} == {
        k: v for k, v in ours.items() if k not in descriptive
    }
    assert ours["general.name"] == "SmolLM2-hub" and ours["general.file_type"] == 1  # mostly F16
    assert {t.name for t in ours_file.tensors} == {t.name for t in published_file.tensors}
    # The directory as transformers wrote it splits like GPT-2 (its GGUF converter drops the digit split).
    assert pre_tokenizer_name(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))) == "gpt-2"


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    """A byte-level BPE tokenizer of 320 ids (the GGUF reader parses SmolLM2's 49,152 tokens in seconds)."""
    from tokenizers import decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the cat sat on the mat, and 12 cats sat there"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2])
    out = tmp_path_factory.mktemp("small-bpe")
    fast.save_pretrained(out)
    return fast


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3.1's rope scaling (its paper's rule), as the factor dividing each frequency."""
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_a_tied_head_and_a_bos_adding_tokenizer(tmp_path, small_bpe):
    tokenizer = small_bpe
    from tests.conftest import make_tiny_llama

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope |= {"original_max_position_embeddings": 256, "rope_theta": 500000.0}
    model = make_tiny_llama(len(tokenizer), hidden_size=64, rope_parameters=rope, tie_word_embeddings=True)
    source = tmp_path / "llama3-like"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"] = LLAMA3_PRE
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [bos], "tokens": ["<|im_start|>"]}},
    }
    (source / "tokenizer.json").write_text(json.dumps(data))
    report = export_gguf(model, source, tmp_path / "model.gguf", "f16")
    assert report["tensor_types"] == {"F32": 1 + 1 + 2 * 2, "F16": 1 + 2 * 7}  # rope_freqs, norms; weights
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and next(iter(tensors)) == "rope_freqs.weight"
    head_dim = 64 // 4
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    expected = _llama3_factors(inv_freq, 8.0, 1.0, 4.0, 256)
    assert np.allclose(tensors["rope_freqs.weight"].data, expected, rtol=1e-5)
    assert len(set(expected.tolist())) > 2  # the rule's three regimes all occur at this size
    fields = _fields(reader)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"] is True and "tokenizer.ggml.add_eos_token" not in fields
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["llama.rope.dimension_count"] == head_dim
    assert fields["llama.vocab_size"] == len(tokenizer) and fields["tokenizer.ggml.bos_token_id"] == bos
    # As a base: transformers' reader takes no rope scaling from a GGUF; Llama 3's rule is read back from
    # the rope_freqs divisors, so the converted model has the file's rope (and the original's logits).
    from transformers import AutoModelForCausalLM

    (tmp_path / "f32").mkdir()
    (tmp_path / "odd").mkdir()
    export_gguf(model, source, tmp_path / "f32" / "model.gguf", "f32")
    converted = AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "f32" / "model.gguf", tmp_path / "cache"))
    assert converted.config.rope_parameters == rope | {"rope_type": "llama3"}
    ids = torch.arange(3, 200)[None]
    with torch.no_grad():
        assert torch.allclose(converted(ids).logits, model(ids).logits, atol=1e-5)
    # Divisors no Llama 3 rule gives are kept as they are (LongRoPE with equal short and long factors).
    odd = np.linspace(1.0, 3.0, head_dim // 2, dtype=np.float32)
    with mock.patch("sqft_service.gguf_hf.rope_factors", lambda config, width: odd):
        export_gguf(model, source, tmp_path / "odd" / "model.gguf", "f32")
    other = AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "odd" / "model.gguf", tmp_path / "cache"))
    assert other.config.rope_parameters["rope_type"] == "longrope"
    assert np.allclose(other.config.rope_parameters["short_factor"], odd)
    assert np.allclose(
        other.model.rotary_emb.inv_freq.numpy(), 1 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim) / odd
    )


def test_which_directories_are_sources_and_what_is_refused(tmp_path, tiny_model_dir, gguf_path):
    assert hf_export_dir(str(tiny_model_dir)) == tiny_model_dir
    assert export_source(str(tiny_model_dir)) == tiny_model_dir
    # A sparse model pruned from a GGUF takes the GGUF's metadata, not its own directory's.
    sparse = _metadata_dir(tiny_model_dir, tmp_path / "sparse")
    (sparse / "sparsity_report.json").write_text(json.dumps({"source_model": str(gguf_path)}))
    assert export_source(str(sparse)) == gguf_path
    no_tokenizer = _metadata_dir(tiny_model_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    gemma = _metadata_dir(tiny_model_dir, tmp_path / "gemma")
    config = json.loads((gemma / "config.json").read_text())
    (gemma / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    for path in (no_tokenizer, gemma, tmp_path / "missing", tmp_path):
        assert export_source(str(path)) is None, path
    # Byte fallback with a byte-level decoder is neither kind llama.cpp runs: refused, nothing written.
    from tests.conftest import make_tiny_llama

    spm = _metadata_dir(tiny_model_dir, tmp_path / "spm")
    data = json.loads((spm / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(data))
    model = make_tiny_llama(49152)
    with pytest.raises(GGUFExportError, match="decoder is not SentencePiece's"):
        export_gguf(model, spm, tmp_path / "spm.gguf")
    assert not (tmp_path / "spm.gguf").exists()
    with pytest.raises(GGUFExportError, match="decoder is not SentencePiece's"):
        check_source(spm)  # what the merge job checks before merging
    scaled = _metadata_dir(tiny_model_dir, tmp_path / "yarn")
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    yarn = make_tiny_llama(49152, rope_parameters=rope)
    with pytest.raises(GGUFExportError, match="'yarn' rope scaling"):
        export_gguf(yarn, scaled, tmp_path / "yarn.gguf")
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    with pytest.raises(GGUFExportError, match="'yarn' rope scaling"):
        check_source(scaled)
    check_source(tiny_model_dir)  # a directory we write passes


def _lines() -> list[str]:
    """Text to train a tokenizer on: code and prose of a few standard modules (the same on every run)."""
    import argparse
    import inspect
    import textwrap

    return [line for m in (argparse, textwrap) for line in inspect.getsource(m).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sentencepiece")
    sentencepiece_tokenizer(out, _lines(), vocab_size=600)
    return out


# Texts with code, runs of spaces, newlines and tabs, digits, and characters outside the vocabulary (bytes).
_TEXTS = [
    "Hello world, this is a test.",
    "def parse_args(self, args=None):\n    return self._parse(args)\n",
    "two  spaces\n\nnewlines\tand tabs 12345 über 東京 🚀",
]


def test_sentencepiece_tokenizers_export_as_llamas(tmp_path, sentencepiece_dir):
    """A Llama 2-style tokenizer becomes GGUF's ``llama`` model: scores in the order of its merges, byte
    tokens BYTE, ``<unk>`` UNKNOWN, the prefix space, BOS added; transformers builds its tokenizer back from
    the GGUF's tokens and scores and encodes every text to the same ids. (llama.cpp itself:
    ``make bench-gguf-hf``.) The hub's older spelling of the same pipeline gives the same fields."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    source = tmp_path / "llama2-like"
    make_tiny_llama(len(tokenizer), hidden_size=64).save_pretrained(source)
    tokenizer.save_pretrained(source)
    model = make_tiny_llama(len(tokenizer), hidden_size=64)
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields = _fields(reader)
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.add_bos_token"] is True
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("unknown", "bos", "eos")] == [0, 1, 2]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types.count(gguf.TokenType.BYTE) == 256 and tokens[types.index(gguf.TokenType.BYTE)] == "<0x00>"
    scores = fields["tokenizer.ggml.scores"]
    merges = json.loads((source / "tokenizer.json").read_text())["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    assert scores[tokens.index(first)] == 0.0 and scores[tokens.index(last)] == -(len(merges) - 1)
    assert scores[3] == -len(merges)  # a byte: no merge makes it
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    for text in _TEXTS:
        ids = tokenizer.encode(text)
        assert back.encode(text) == ids and len(ids) < len(text.encode()) * 0.8, text
    # The same tokenizer as the hub's Llama 2 files spell it (normalizers instead of the Metaspace), loaded
    # as a Llama tokenizer (transformers 5 rebuilds its pipeline) or kept as the file says: the same fields.
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"] = None
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    (source / "tokenizer.json").write_text(json.dumps(data))
    tokenizer_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    for tokenizer_class in ("LlamaTokenizer", "PreTrainedTokenizerFast"):
        _set_tokenizer_config(source, tokenizer_class=tokenizer_class)
        export_gguf(model, source, tmp_path / "older.gguf", "f32")
        older = _fields(gguf.GGUFReader(str(tmp_path / "older.gguf")))
        assert {k: v for k, v in older.items() if k.startswith("tokenizer.")} == tokenizer_fields, tokenizer_class
    # Split at every space (kept as the file says): llama.cpp merges across spaces, so refused.
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (source / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(GGUFExportError, match="splits at spaces"):
        check_source(source)
    data["pre_tokenizer"] = {**data["pre_tokenizer"], "split": False}
    data["model"]["merges"] = []
    (source / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(GGUFExportError, match="no merges"):
        check_source(source)


def _set_tokenizer_config(model_dir: Path, **fields) -> None:
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_the_prefix_space_is_the_one_transformers_loads(tmp_path, sentencepiece_dir):
    """transformers 5 rebuilds a Llama tokenizer's Metaspace from ``tokenizer_config.json`` whatever
    ``tokenizer.json`` spells; the model was trained on what transformers loaded, and the GGUF follows it."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama

    source = tmp_path / "never"
    shutil.copytree(sentencepiece_dir, source)
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}
    (source / "tokenizer.json").write_text(json.dumps(data))
    model = make_tiny_llama(len(AutoTokenizer.from_pretrained(source)), hidden_size=64)
    for tokenizer_class, prefix in (("LlamaTokenizer", True), ("PreTrainedTokenizerFast", False)):
        _set_tokenizer_config(source, tokenizer_class=tokenizer_class)
        first = AutoTokenizer.from_pretrained(source).tokenize("hello")[0]
        assert first.startswith("▁") is prefix, tokenizer_class
        export_gguf(model, source, tmp_path / "model.gguf", "f32")
        fields = _fields(gguf.GGUFReader(str(tmp_path / "model.gguf")))
        assert fields["tokenizer.ggml.add_space_prefix"] is prefix, tokenizer_class


def test_mistral_directories_export_as_llama_within_their_window(tmp_path, sentencepiece_dir):
    """Mistral is GGUF's ``llama`` architecture, as llama.cpp's converter writes it; that has no sliding
    window, so the context length written is the window, where the two attend alike. transformers reads
    the file back as the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    model = make_tiny_causal_lm("mistral", len(tokenizer), hidden_size=64, intermediate_size=128, sliding_window=128)
    source = tmp_path / "tiny-mistral"  # (transformers' GGUF reader fails a file named exactly "mistral")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert export_source(str(source)) == source
    check_source(source)
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    fields = _fields(gguf.GGUFReader(str(tmp_path / "model.gguf")))
    assert fields["general.architecture"] == "llama" and fields["llama.context_length"] == 128
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(_TEXTS[1])])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def _checked_source(model, tokenizer, source: Path, pre: dict | None = None) -> Path:
    """``model`` and ``tokenizer`` saved as a model directory (with the pre-tokenizer ``pre``, if given),
    which GGUF export takes as a source and whose checks (the merge's, before it starts) it passes."""
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    if pre is not None:
        data = json.loads((source / "tokenizer.json").read_text())
        (source / "tokenizer.json").write_text(json.dumps({**data, "pre_tokenizer": pre}))
    assert export_source(str(source)) == source
    check_source(source)
    return source


def test_qwen3_directories_export_with_their_qk_norms_and_head_width(tmp_path, small_bpe):
    """Qwen3: GGUF's ``qwen3`` architecture, its per-head q/k norms as F32 tensors, its head width (wider
    than hidden size over heads) as the key and value lengths, Qwen2's pre-tokenizer; a sliding window
    becomes the context length. The file as a base loads with that head width."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_causal_lm(
        "qwen3", len(small_bpe), hidden_size=64, intermediate_size=128, head_dim=32, tie_word_embeddings=True
    )
    with torch.no_grad():  # norms away from 1 and each other, so a norm left out or swapped shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    source = _checked_source(model, small_bpe, tmp_path / "tiny-qwen3", QWEN2_PRE)
    report = export_gguf(model, source, tmp_path / "model.gguf", "f32")
    assert report["tensor_types"] == {"F32": 1 + 1 + 2 * (7 + 4)}  # embedding, norm; 7 linears + 4 norms
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "qwen3" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 32
    assert fields["qwen3.context_length"] == 512
    tensors = {t.name: t.data for t in reader.tensors}
    layer = model.model.layers[1].self_attn
    for name, weight in (("attn_q_norm", layer.q_norm), ("attn_k_norm", layer.k_norm), ("attn_q", layer.q_proj)):
        assert np.array_equal(tensors[f"blk.1.{name}.weight"], weight.weight.detach().numpy()), name
    # As a base: the head width comes from the file (transformers alone would build its default 128-wide
    # heads), so the converted model gives the original's logits, and a merge of it exports the same file.
    converted = convert_gguf(tmp_path / "model.gguf", tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert loaded.config.head_dim == 32
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    export_gguf(loaded, tmp_path / "model.gguf", tmp_path / "again.gguf", "f32")
    again = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert again.keys() == tensors.keys() and all(np.array_equal(again[n], tensors[n]) for n in again)
    model.config.use_sliding_window, model.config.sliding_window = True, 64
    export_gguf(model, source, tmp_path / "sliding.gguf", "f32")
    assert _fields(gguf.GGUFReader(str(tmp_path / "sliding.gguf")))["qwen3.context_length"] == 64


@pytest.fixture(scope="module")
def gemma_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma-tokenizer")
    sentencepiece_tokenizer(out, _lines(), vocab_size=600, style="gemma")
    return out


def _tiny_gemma3(vocab_size: int, model_type: str = "gemma3_text", **overrides):
    """Six layers (Gemma 3: five sliding, one global; Gemma 2: alternating; llama.cpp's patterns), heads
    wider than hidden size over heads, every norm away from zero (Gemma scales by 1 + weight, so a shift
    left out shows)."""
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32)
    shape |= dict(sliding_window=16, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    model = make_tiny_causal_lm(model_type, vocab_size, **(shape | overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model


def test_gemma3_directories_export_with_shifted_norms_and_their_window(tmp_path, gemma_tokenizer_dir):
    """Gemma 3 (text) is GGUF's ``gemma3``: every norm written as 1 + weight (llama.cpp multiplies by the
    weight), the four norms of a layer, key/value length and sliding window written, the Gemma tokenizer
    (no space prefix: transformers 5's Replace normalizer and no-op Split) as SentencePiece. transformers'
    GGUF reader takes the shift back off, and that GGUF as a base exports the same file. A Gemma 3 that
    llama.cpp would run otherwise is refused, before the merge (``check_source``) and at export, naming
    what differs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    model = _tiny_gemma3(len(tokenizer))
    source = _checked_source(model, tokenizer, tmp_path / "tiny-gemma3")
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t for t in reader.tensors}
    assert fields["general.architecture"] == "gemma3" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["gemma3.attention.key_length"] == fields["gemma3.attention.value_length"] == 32
    assert fields["gemma3.attention.sliding_window"] == 16 and fields["gemma3.context_length"] == 512
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    norms = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")
    assert {f"blk.5.{n}.weight" for n in norms} <= tensors.keys() and "output.weight" not in tensors
    written = tensors["blk.5.post_ffw_norm.weight"].data
    assert np.array_equal(written, model.model.layers[5].post_feedforward_layernorm.weight.detach().numpy() + 1)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    theirs = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.allclose(theirs[key], value, atol=1e-6), key
    # Its query scale (transformers' reader keeps 256; llama.cpp's rule gives the head width) from the file:
    # as a base, the same logits.
    converted = AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "model.gguf", tmp_path / "cache"))
    ids = torch.tensor([tokenizer.encode(" ".join(_TEXTS))])
    with torch.no_grad():
        assert torch.allclose(converted(ids).logits, model(ids).logits, atol=1e-5)
    # A merge of that GGUF as a base (metadata copied from it) writes the same tensors again.
    export_gguf(loaded, tmp_path / "model.gguf", tmp_path / "again.gguf", "f32")
    again = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert again.keys() == tensors.keys()
    assert all(np.allclose(again[name], tensors[name].data, atol=1e-6) for name in again)
    for overrides, named in (
        (dict(query_pre_attn_scalar=256), "query_pre_attn_scalar 256, not 32"),
        (dict(layer_types=["full_attention"] * 6), "global attention at layers other than every sixth"),
        (dict(final_logit_softcapping=30.0), "final_logit_softcapping 30.0"),
    ):
        other = _tiny_gemma3(len(tokenizer), **overrides)
        directory = tmp_path / f"other-{len(named)}"
        other.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        with pytest.raises(GGUFExportError, match=named):
            check_source(directory)
        with pytest.raises(GGUFExportError, match=named):
            export_gguf(other, directory, tmp_path / "other.gguf")


def test_gemma3_linear_rope_scaling_is_written_and_read_back(tmp_path, gemma_tokenizer_dir):
    """Gemma 3 4B and up scale their global layers' rope linearly (by 8): the export writes it, and as a base
    the file gives that scaling back (transformers' GGUF reader drops it), so the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    rope["sliding_attention"] = {"rope_type": "default", "rope_theta": 10000.0}
    model = _tiny_gemma3(len(tokenizer), rope_parameters=rope)
    source = _checked_source(model, tokenizer, tmp_path / "tiny-gemma3-4b")
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    fields = _fields(gguf.GGUFReader(str(tmp_path / "model.gguf")))
    assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
    converted = AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "model.gguf", tmp_path / "cache"))
    assert converted.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    ids = torch.tensor([tokenizer.encode(" ".join(_TEXTS))])
    with torch.no_grad():
        ours = model(ids).logits
        assert torch.allclose(converted(ids).logits, ours, atol=1e-5)
        plain = _tiny_gemma3(len(tokenizer), rope_parameters={**rope, "full_attention": {"rope_theta": 1e6}})
        assert (plain(ids).logits - ours).abs().max() > 1e-3  # the scaling matters here


def test_gemma2_directories_export_with_their_soft_caps(tmp_path, gemma_tokenizer_dir):
    """Gemma 2 is GGUF's ``gemma2``: norms shifted as Gemma 3's, every other layer sliding, and its logit
    soft-capping written (llama.cpp caps always, by the file's values). Read back as a base: the same
    logits over more positions than the window. A Gemma 2 that llama.cpp would run otherwise (no caps, an
    untied head, another layer pattern) is refused before the merge, naming the setting."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    model = _tiny_gemma3(len(tokenizer), "gemma2", attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    source = _checked_source(model, tokenizer, tmp_path / "tiny-gemma2")
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t.data for t in reader.tensors}
    assert fields["general.architecture"] == "gemma2" and fields["gemma2.attention.sliding_window"] == 16
    assert fields["gemma2.attn_logit_softcapping"] == 5.0 and fields["gemma2.final_logit_softcapping"] == 3.0
    norms = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
    assert {f"blk.5.{n}.weight" for n in norms} <= tensors.keys() and "output.weight" not in tensors
    written = tensors["blk.5.post_attention_norm.weight"]
    assert np.array_equal(written, model.model.layers[5].post_attention_layernorm.weight.detach().numpy() + 1)
    converted = convert_gguf(tmp_path / "model.gguf", tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(" ".join(_TEXTS))])
    assert ids.shape[1] > 16
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    for overrides, named in (
        (dict(final_logit_softcapping=None), "no final_logit_softcapping"),
        (dict(tie_word_embeddings=False), "a head not tied to the embedding"),
        (dict(layer_types=["full_attention"] * 6), "global attention at layers other than every other"),
    ):
        other = _tiny_gemma3(len(tokenizer), "gemma2", **overrides)
        directory = tmp_path / f"other-{len(named)}"
        other.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        with pytest.raises(GGUFExportError, match=f"Gemma 2 as llama.cpp runs it; this one has {named}"):
            check_source(directory)


def test_smollm3_directories_export_as_llamacpp_runs_them(tmp_path, small_bpe):
    """SmolLM3: GGUF's ``smollm3``, Llama's tensors (q/k rows interleaved for llama.cpp's rope), Llama 3's
    pre-tokenizer; its rope-less layers (every fourth) are fixed in llama.cpp's code, so another pattern is
    refused, before the merge and at export. transformers reads no ``smollm3`` GGUF: as a base, the file is
    refused with transformers' reason, as is a file that is no GGUF."""
    model = make_tiny_causal_lm(
        "smollm3", len(small_bpe), hidden_size=64, num_hidden_layers=4, tie_word_embeddings=True
    )
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    source = _checked_source(model, small_bpe, tmp_path / "tiny-smollm3", LLAMA3_PRE)
    report = export_gguf(model, source, tmp_path / "model.gguf", "f32")
    assert report["tensor_types"] == {"F32": 1 + 1 + 4 * (7 + 2)}  # embedding, norm; 7 linears + 2 norms
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t.data for t in reader.tensors}
    assert fields["general.architecture"] == "smollm3" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert "output.weight" not in tensors
    k_proj = model.model.layers[3].self_attn.k_proj.weight.detach().numpy()
    assert not np.array_equal(tensors["blk.3.attn_k.weight"], k_proj)  # interleaved, as llama.cpp's converter
    assert np.array_equal(np.sort(tensors["blk.3.attn_k.weight"], axis=0), np.sort(k_proj, axis=0))
    with pytest.raises(ModelLoadError, match=r"could not read GGUF file 'model\.gguf': .*architecture smollm3"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "cache")
    (tmp_path / "damaged.gguf").write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(ModelLoadError, match=r"could not read GGUF file 'damaged\.gguf'"):
        convert_gguf(tmp_path / "damaged.gguf", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/config.json"))  # nothing cached for either
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "no_rope_layers": [1, 0, 1, 0]}))
    with pytest.raises(GGUFExportError, match=r"no_rope_layers are \[1, 0, 1, 0\]"):
        check_source(source)
    model.config.no_rope_layers = [1, 0, 1, 0]
    with pytest.raises(GGUFExportError, match="without rope at every fourth layer only"):
        export_gguf(model, source, tmp_path / "other.gguf")


def test_olmo2_directories_export_with_their_post_norms_and_a_head(tmp_path, small_bpe):
    """OLMo 2 is GGUF's ``olmo2``: q/k norms over whole projections, norms after attention and MLP (none
    before), q/k rows as they are (NeoX rope); llama.cpp loads no OLMo 2 without an ``output`` tensor, so a
    tied head is written too."""
    model = make_tiny_causal_lm("olmo2", len(small_bpe), hidden_size=64, tie_word_embeddings=True)
    with torch.no_grad():  # norms away from 1, so one left out or swapped shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    source = _checked_source(model, small_bpe, tmp_path / "tiny-olmo2", LLAMA3_PRE)
    report = export_gguf(model, source, tmp_path / "model.gguf", "f32")
    assert report["tensor_types"] == {"F32": 3 + 2 * (7 + 4)}  # embedding, head, norm; 7 linears + 4 norms
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t.data for t in reader.tensors}
    assert fields["general.architecture"] == "olmo2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    layer = model.model.layers[1]
    assert tensors["blk.1.attn_q_norm.weight"].shape == (64,)  # the whole projection's
    for name, module in (
        ("attn_q_norm", layer.self_attn.q_norm),
        ("attn_k", layer.self_attn.k_proj),
        ("post_attention_norm", layer.post_attention_layernorm),
        ("post_ffw_norm", layer.post_feedforward_layernorm),
    ):
        assert np.array_equal(tensors[f"blk.1.{name}.weight"], module.weight.detach().numpy()), name
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])


# The most a weight of each 4- and 5-bit type moves, relative to the largest in its tensor. Q4_1 / Q5_1:
# half a step of the block's range in 15 / 31 steps. Q4_0 / Q5_0: a whole step d = absmax / 8 (/ 16),
# since the codes reach -8 d but only +7 d: the side opposite the largest weight is clipped by up to d.
_HALF_STEP = {"q4_0": 1 / 7.9, "q4_1": 1 / 14.5, "q5_0": 1 / 15.9, "q5_1": 1 / 30}


@pytest.mark.parametrize("out_type", sorted(_HALF_STEP))
def test_four_and_five_bit_exports(tmp_path, small_bpe, out_type):
    """The linears in the asked type, the embedding and the head in Q8_0, norms F32; each weight within
    half a step of its value; transformers reads the file back (de-quantizing with the gguf package)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(small_bpe), hidden_size=64, intermediate_size=128)
    pruned = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        pruned[pruned.abs() < pruned.abs().median()] = 0.0  # a SparsePEFT merge's zeros
    source = tmp_path / "tiny"
    model.save_pretrained(source)
    small_bpe.save_pretrained(source)
    report = export_gguf(model, source, tmp_path / "model.gguf", out_type)
    qtype = out_type.upper()
    assert report["tensor_types"] == {qtype: 2 * 7, "Q8_0": 2, "F32": 1 + 2 * 2}
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert int(reader.get_field("general.file_type").contents()) == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    theirs = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith("_proj.weight"):
            error = (theirs[key] - value).abs().max()
            assert 0 < error <= _HALF_STEP[out_type] * value.abs().max(), key
    assert torch.equal(theirs["model.norm.weight"], model.state_dict()["model.norm.weight"])
    # Zero is a code of the symmetric types; the others' grids start at each block's minimum.
    zeros = theirs["model.layers.1.mlp.down_proj.weight"][pruned == 0]
    assert (zeros == 0).all() if out_type.endswith("_0") else (zeros != 0).any()


def test_phi3_directories_export_their_fused_projections_and_partial_rope(tmp_path, sentencepiece_dir):
    """Phi-3 is GGUF's ``phi3``: the fused ``qkv_proj`` and ``gate_up_proj`` written as they are (llama.cpp's
    ``attn_qkv`` and ``ffn_up``), the rope over part of each head as the rope width, the sliding window
    (off in llama.cpp) as the context length. As a base the file loads back with that rope width
    (transformers' reader alone would turn whole heads) and the same logits; LongRoPE is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    shape = dict(hidden_size=64, intermediate_size=96, num_key_value_heads=2, sliding_window=100)
    model = make_tiny_causal_lm("phi3", len(tokenizer), rope_parameters=rope, **shape)
    source = _checked_source(model, tokenizer, tmp_path / "tiny-phi3")
    report = export_gguf(model, source, tmp_path / "model.gguf", "f32")
    assert report["tensor_types"] == {"F32": 2 + 1 + 2 * (4 + 2)}  # embedding, head, norm; 4 linears + 2 norms
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t.data for t in reader.tensors}
    assert fields["general.architecture"] == "phi3" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["phi3.rope.dimension_count"] == 8 and fields["phi3.context_length"] == 100
    # llama.cpp takes a model named for Phi-3 to hold Phi-3's special tokens; this vocabulary has no
    # <|endoftext|>, so the name is written so that llama.cpp loads it.
    assert fields["general.name"] == "tiny-phi_3"
    layer = model.model.layers[1]
    assert tensors["blk.1.attn_qkv.weight"].shape == (64 + 2 * 32, 64)
    assert np.array_equal(tensors["blk.1.attn_qkv.weight"], layer.self_attn.qkv_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_up.weight"], layer.mlp.gate_up_proj.weight.detach().numpy())
    converted = convert_gguf(tmp_path / "model.gguf", tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert loaded.config.rope_parameters["partial_rotary_factor"] == 0.5
    ids = torch.tensor([tokenizer.encode(_TEXTS[1])])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    export_gguf(loaded, tmp_path / "model.gguf", tmp_path / "again.gguf", "f32")
    again = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert again.keys() == tensors.keys() and all(np.array_equal(again[n], tensors[n]) for n in again)


def test_phi3_longrope_is_written_as_llamacpp_factors_within_the_original_context(tmp_path, sentencepiece_dir):
    """Phi-3.5's LongRoPE: its short and long factors as llama.cpp's ``rope_factors_short``/``_long``, the
    attention factor transformers computes, and the original context as the context length (llama.cpp
    takes the long factors in any longer context, transformers only for longer sequences). Read back as a
    base, the file gives the same LongRoPE model: the same logits. Another family's LongRoPE is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    generator = torch.Generator().manual_seed(0)
    short, long = 1 + torch.rand(4, generator=generator), 2 + 6 * torch.rand(4, generator=generator)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    rope |= {"short_factor": short.tolist(), "long_factor": long.tolist()}
    shape = dict(hidden_size=64, intermediate_size=96, max_position_embeddings=1024)
    model = make_tiny_causal_lm(
        "phi3", len(tokenizer), rope_parameters=rope, original_max_position_embeddings=256, **shape
    )
    source = _checked_source(model, tokenizer, tmp_path / "tiny-phi35")
    export_gguf(model, source, tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields, tensors = _fields(reader), {t.name: t.data for t in reader.tensors}
    assert fields["phi3.context_length"] == fields["phi3.rope.scaling.original_context_length"] == 256
    assert math.isclose(
        fields["phi3.rope.scaling.attn_factor"], math.sqrt(1 + math.log(4) / math.log(256)), rel_tol=1e-6
    )
    assert np.array_equal(tensors["rope_factors_short.weight"], short.numpy())
    assert np.array_equal(tensors["rope_factors_long.weight"], long.numpy())
    converted = convert_gguf(tmp_path / "model.gguf", tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert loaded.config.rope_parameters["rope_type"] == "longrope"
    ids = torch.tensor([tokenizer.encode(" ".join(_TEXTS))])
    with torch.no_grad():
        ours = model(ids).logits
        assert torch.allclose(loaded(ids).logits, ours, atol=1e-5)
        # The control: the same model with default rope is another model.
        plain = make_tiny_causal_lm("phi3", len(tokenizer), rope_parameters=rope | {"rope_type": "default"}, **shape)
        assert (plain(ids).logits - ours).abs().max() > 1e-3  # a hundred times the tolerance above
    export_gguf(loaded, tmp_path / "model.gguf", tmp_path / "again.gguf", "f32")
    again = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert again.keys() == tensors.keys() and all(np.array_equal(again[n], tensors[n]) for n in again)
    qwen_rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    qwen = make_tiny_causal_lm(
        "qwen2", len(tokenizer), rope_parameters=qwen_rope, original_max_position_embeddings=256, **shape
    )
    directory = tmp_path / "qwen2-longrope"
    qwen.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with pytest.raises(GGUFExportError, match="'longrope' rope scaling in qwen2"):
        check_source(directory)
