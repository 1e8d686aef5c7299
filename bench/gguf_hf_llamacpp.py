"""GGUF exports from plain model directories, run by llama.cpp: does it tokenize and compute as transformers?

``gguf_hf.py`` derives a GGUF's settings and tokenizer from a model directory instead of copying them from
a GGUF. This runs each export in llama.cpp (``llama-cpp-python``, built by ``make bench-gguf``'s rule into
``.llamacpp/``; pass ``--llama-cpp-path``) against transformers on the same directory:

* SmolLM2-135M as a model directory with its hub tokenizer's pre-tokenizer (digits split one by one:
  llama.cpp's "smollm"), and as transformers' GGUF conversion writes it (GPT-2's split: "gpt-2"):
  token ids of a set of texts (digits, code, contractions, non-Latin, emoji, runs of spaces and newlines),
  and the logits of a prompt (F32 export); and (hub pre-tokenizer) the loss on 40 held-out ARC-E records
  of the export in each weight type, in llama.cpp, against transformers in float32;
* random tiny Llamas with Llama 3's tokenizer split ("llama-bpe"), Llama 3's rope scaling (llama.cpp's
  ``rope_freqs``) and a tied head, a random tiny Qwen2 with biases ("qwen2") and a random tiny Qwen3
  (q/k norms, heads wider than hidden size over heads, a tied head), a random tiny SmolLM3 (no rope at
  every fourth layer), a random tiny Phi-3 (fused projections, rope over half of each head) and one with
  Phi-4-mini's LongRoPE (over 3/4 of each head) and GPT-4o's split ("gpt-4o"), a random tiny OLMo 2
  (q/k norms over whole projections, norms after attention and MLP): token ids of the texts
  (SmolLM2's vocabulary with each split) and logits over 300 positions, where the scaled rope
  frequencies matter (and, as controls, the Llama 3 one exported with every rope factor 1, and the
  SmolLM3, Phi-3 and OLMo 2 files against transformers with rope at every layer, over whole heads,
  without LongRoPE, with q/k norms of 1);
* a Llama 2-style SentencePiece tokenizer (``bench/hub_tokenizers.py``, trained on ARC-E) on a random tiny
  Llama and a random tiny Mistral: token ids against transformers and against SentencePiece itself (and
  of a text with special tokens in it), and logits;
* a Gemma-style SentencePiece tokenizer on a random tiny Gemma 3 of 12 layers (sliding windows of 64
  positions, two global layers) and a Gemma 2 (every other layer global, logits soft-capped): token ids
  and logits over 300 positions (and, as controls, the Gemma 3 export without its sliding window, the
  Gemma 2 file against transformers without soft-caps).

Prints and saves ``bench/results/<date>-gguf-hf-llamacpp-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .throughput.inputs import CACHE, default_model
from .throughput.report import write_machine_results

TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "I'm sure it's 12345 or 3.14159, isn't it? Don'T  'Ve   they'll",
    "def f(x):\n    return x**2 + 1  # squares\n\n\n\tindented\r\nwindows line",
    "über Straße — 東京 and Москва, 🚀🚀 emoji, résumé; ½ + ¾ = 1¼",
    "   leading spaces and trailing   ",
    "parseHTTPResponse(userID) in ./usr/local/lib — we'RE DON'T CamelCase",
    "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n56<|im_end|>",
    "a1b22c333d4444 x=100000, y=-2.5e-3; $1,234.56 (approx.)",
]


def _llama(path: Path, n_ctx: int = 512):
    """llama.cpp on ``path`` with a float32 KV cache: these runs check the file, and llama.cpp's default
    float16 cache alone puts random models of a few sharp layers 0.03-0.25 apart from transformers."""
    import llama_cpp

    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        logits_all=True,
        n_threads=torch.get_num_threads(),
        verbose=False,
        n_batch=512,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def _llama_logits(llama, ids: list[int]) -> np.ndarray:
    llama.reset()
    llama.eval(ids)
    return np.asarray(llama.scores[: len(ids)], dtype=np.float64)


def _exported(model, tokenizer, source: Path, pre: dict | None = None) -> tuple[Path, Path, Any]:
    """``model`` and ``tokenizer`` saved as the model directory ``source`` (its pre-tokenizer replaced by
    ``pre``, if given), exported beside it as an F32 GGUF, and that file loaded in llama.cpp: the directory,
    the file and the ``Llama``."""
    from sqft_service.gguf_export import export_gguf

    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    if pre is not None:
        data = json.loads((source / "tokenizer.json").read_text())
        data["pre_tokenizer"] = pre
        (source / "tokenizer.json").write_text(json.dumps(data))
    out = source.with_suffix(".gguf")
    export_gguf(model, source, out, "f32")
    return source, out, _llama(out)


def _compare_logits(model, llama, ids: list[int]) -> dict:
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    theirs = _llama_logits(llama, ids)
    return {
        "positions": len(ids),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "logit_scale": float(np.abs(ours).max()),
        "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }


def _tokenization(tokenizer, llama) -> dict:
    agree = 0
    mismatches = []
    for text in TEXTS:
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = llama.tokenize(text.encode(), add_bos=False, special=True)
        agree += ours == theirs
        if ours != theirs:
            mismatches.append({"text": text, "transformers": ours, "llama.cpp": theirs})
    return {"texts": len(TEXTS), "same_ids": agree, "mismatches": mismatches}


def _smollm2(work: Path, pre: dict | None, name: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqft_service.gguf_export import export_gguf
    from sqft_service.training.models import convert_gguf

    converted = convert_gguf(default_model(), CACHE / "models")
    source = work / name
    source.mkdir()
    for path in converted.iterdir():
        if path.suffix == ".safetensors":
            (source / path.name).symlink_to(path)
        else:
            shutil.copy(path, source / path.name)
    if pre is not None:
        data = json.loads((source / "tokenizer.json").read_text())
        data["pre_tokenizer"] = pre
        (source / "tokenizer.json").write_text(json.dumps(data))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    out = work / f"{name}.gguf"
    started = time.perf_counter()
    report = export_gguf(model, source, out, "f32")
    seconds = time.perf_counter() - started
    llama = _llama(out)
    ids = tokenizer.encode(TEXTS[0] + " " + TEXTS[2], add_special_tokens=False)
    return {
        **({"weight_types": _weight_types(work, model, tokenizer, source)} if pre is not None else {}),
        "pre_tokenizer": _pre(out),
        "export_s": round(seconds, 2),
        "bytes": report["bytes"],
        "tokenization": _tokenization(tokenizer, llama),
        "logits": _compare_logits(model, llama, ids),
    }


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of ``ids[1:]`` under ``logits`` (float64)."""
    logits = logits[: len(ids) - 1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def _weight_types(work: Path, model, tokenizer, source: Path) -> dict:
    """Held-out loss of SmolLM2 exported in each weight type, in llama.cpp, against transformers."""
    from sqft_service.gguf_export import export_gguf
    from sqft_service.model_sources import GGUF_TYPES

    records = json.loads(Path("../shared/data/arce_train_instruct.json").read_text())[-40:]
    texts = [f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}" for r in records]
    sequences = [tokenizer.encode(t, add_special_tokens=False)[:192] for t in texts]
    n_tokens = sum(len(ids) - 1 for ids in sequences)
    with torch.no_grad():
        reference = sum(_nll(model(torch.tensor([ids])).logits[0].double().numpy(), ids) for ids in sequences)
    rows = {"transformers_fp32": {"loss": round(reference / n_tokens, 4)}}
    for out_type in GGUF_TYPES:
        path = work / f"smollm2-{out_type}.gguf"
        started = time.perf_counter()
        export_gguf(model, source, path, out_type)
        seconds = time.perf_counter() - started
        llama = _llama(path)
        total = sum(_nll(_llama_logits(llama, ids), ids) for ids in sequences)
        rows[out_type] = {
            "loss": round(total / n_tokens, 4),
            "mb": round(path.stat().st_size / 1e6),
            "export_s": round(seconds, 1),
        }
        del llama
        path.unlink()
    return {"records": len(sequences), "tokens": n_tokens, "types": rows}


def _pre(path: Path) -> str:
    import gguf

    return str(gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents())


def _tiny(work: Path, kind: str, tokenizer_dir: Path, pre: dict) -> dict:
    from transformers import AutoTokenizer

    from sqft_service.gguf_export import export_gguf

    from .tiny_llama import make_tiny_causal_lm

    shape = dict(hidden_size=256, intermediate_size=512, max_position_embeddings=4096)
    if kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        rope |= {"original_max_position_embeddings": 256, "rope_theta": 500000.0}
        model = make_tiny_causal_lm("llama", 49152, rope_parameters=rope, tie_word_embeddings=True, **shape)
    elif kind == "qwen3":  # heads wider than hidden size over heads, as Qwen3's are; q/k norms away from 1
        model = make_tiny_causal_lm("qwen3", 49152, head_dim=128, tie_word_embeddings=True, **shape)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    elif kind == "smollm3":  # 4 layers, the 4th rope-less
        model = make_tiny_causal_lm("smollm3", 49152, num_hidden_layers=4, tie_word_embeddings=True, **shape)
    elif kind.startswith("phi3"):
        model = _tiny_phi3(kind, shape)
    elif kind == "olmo2":  # q/k normalized over whole projections: the norms' weights set how sharp attention is
        model = make_tiny_causal_lm("olmo2", 49152, **shape)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".self_attn." in name and name.endswith("norm.weight"):
                    p.uniform_(2.0, 4.0)
                elif name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    else:
        model = make_tiny_causal_lm(kind, 49152, **shape)
    _sharpen(model)
    source, out, llama = _exported(model, AutoTokenizer.from_pretrained(tokenizer_dir), work / kind, pre)
    ids = torch.randint(20, 49152, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    result = {"pre_tokenizer": _pre(out), "tokenization": _tokenization(AutoTokenizer.from_pretrained(source), llama)}
    result["logits"] = _compare_logits(model, llama, ids)
    if kind == "smollm3":  # the control: transformers with rope at every layer, against the same file
        import copy

        roped = copy.deepcopy(model)
        for layer in roped.model.layers:
            layer.self_attn.use_rope = 1
        result["logits_against_rope_everywhere"] = _compare_logits(roped, llama, ids)
    if kind == "llama3":  # the control: the same export with every rope factor 1 (the scaling left out)
        from unittest import mock

        from sqft_service import gguf_hf

        unscaled = work / f"{kind}-unscaled.gguf"
        with mock.patch.object(gguf_hf, "rope_factors", lambda c, d: np.ones(d // 2, dtype=np.float32)):
            export_gguf(model, source, unscaled, "f32")
        result["logits_without_rope_factors"] = _compare_logits(model, _llama(unscaled), ids)
    if kind == "olmo2":  # the control: transformers with q/k norms of 1, against the same file
        import copy

        plain = copy.deepcopy(model)
        with torch.no_grad():
            for layer in plain.model.layers:
                layer.self_attn.q_norm.weight.fill_(1.0)
                layer.self_attn.k_norm.weight.fill_(1.0)
        result["logits_against_unit_qk_norms"] = _compare_logits(plain, llama, ids)
    if kind.startswith("phi3"):  # the control: transformers with rope over whole heads / without LongRoPE
        other = _sharpen(_tiny_phi3(kind, shape, control=True))
        result["logits_against_whole_heads" if kind == "phi3" else "logits_against_default_rope"] = _compare_logits(
            other, llama, ids
        )
    return result


def _sharpen(model):
    """``model`` with its q and k projections scaled by 8: weights big enough that the attention pattern (and
    so the rope) shows in the logits."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if hasattr(attention, "qkv_proj"):  # Phi-3: [q; k; v] rows in one projection
                width = attention.head_dim
                rows = (attention.config.num_attention_heads + attention.config.num_key_value_heads) * width
                attention.qkv_proj.weight[:rows].mul_(8.0)
            else:
                attention.q_proj.weight.mul_(8.0)
                attention.k_proj.weight.mul_(8.0)
    return model.eval()


def _tiny_phi3(kind: str, shape: dict, control: bool = False):
    """A tiny Phi-3 with rope over half of each head and a sliding window (``phi3``), or Phi-4-mini's
    LongRoPE over 3/4 of each head, short factors of 1-2 and long ones of 2-8, 16k of a 4k context
    (``phi3_longrope``); ``control``: the same weights with rope over whole heads / the default rope."""
    from .tiny_llama import make_tiny_causal_lm

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if kind == "phi3":
        rope = rope | {"partial_rotary_factor": 1.0} if control else rope
        return make_tiny_causal_lm("phi3", 49152, rope_parameters=rope, sliding_window=1024, **shape)
    factors = torch.Generator().manual_seed(0)
    rope |= {"rope_type": "default" if control else "longrope", "partial_rotary_factor": 0.75}
    rope |= {"short_factor": (1 + torch.rand(24, generator=factors)).tolist()}
    rope |= {"long_factor": (2 + 6 * torch.rand(24, generator=factors)).tolist()}
    longer = shape | {"max_position_embeddings": 16384, "original_max_position_embeddings": 4096}
    return make_tiny_causal_lm("phi3", 49152, rope_parameters=rope, **longer)


def _arce_lines() -> list[str]:
    """The ARC-E training records as plain text lines, to train the SentencePiece tokenizers on."""
    records = json.loads(Path("../shared/data/arce_train_instruct.json").read_text())
    return [f"{r['instruction']} {r.get('input') or ''} {r['output']}" for r in records]


def _sentencepiece(work: Path) -> dict:
    """A SentencePiece tokenizer (GGUF's ``llama`` model) with a tiny Llama and a tiny Mistral."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from .hub_tokenizers import sentencepiece_tokenizer

    lines = _arce_lines()
    tokenizer = sentencepiece_tokenizer(work / "spm", lines, vocab_size=2000)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(work / "spm" / "tokenizer.model"))
    shape = dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    shape |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    results = {}
    for kind, make in (
        ("llama2", lambda: LlamaForCausalLM(LlamaConfig(**shape))),
        ("mistral", lambda: MistralForCausalLM(MistralConfig(**shape, sliding_window=1024))),
    ):
        torch.manual_seed(0)
        model = make().eval()
        _, _, llama = _exported(model, tokenizer, work / f"tiny-{kind}")
        same_as_sentencepiece = sum(
            processor.encode(t) == llama.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS
        )
        ids = tokenizer.encode(" ".join(TEXTS[:4]), add_special_tokens=False)
        after_special = "Which is a mammal?</s> A whale</s>\nB: a shark"
        ours = tokenizer.encode(after_special, add_special_tokens=False)
        theirs = llama.tokenize(after_special.encode(), add_bos=False, special=True)
        results[kind] = {
            "tokenization": _tokenization(tokenizer, llama),
            # transformers' Metaspace (prepend_scheme "first") adds no "▁" after a special token; llama.cpp does
            "text_after_special_tokens": {
                "same_ids": ours == theirs,
                "transformers": tokenizer.convert_ids_to_tokens(ours),
                "llama.cpp": tokenizer.convert_ids_to_tokens(theirs),
            },
            "same_ids_as_sentencepiece": same_as_sentencepiece,
            "logits": _compare_logits(model, llama, ids),
        }
    return results


def _gemma(work: Path, model_type: str = "gemma3_text") -> dict:
    """A Gemma-style SentencePiece tokenizer (trained on ARC-E) on a random tiny Gemma 3 of 12 layers (two
    global, ten sliding over 64 positions), or Gemma 2 (alternating; attention and final logits soft-capped
    at 5 and 1, low enough to bind): ids against transformers and SentencePiece, and the logits over 300
    positions, where the sliding window, its own rope base, the layer pattern and the caps all matter."""
    import copy
    from unittest import mock

    import gguf
    import sentencepiece

    from sqft_service.gguf_export import export_gguf

    from .hub_tokenizers import sentencepiece_tokenizer
    from .tiny_llama import make_tiny_causal_lm

    lines = _arce_lines()
    tokenizer = sentencepiece_tokenizer(work / "gemma-spm", lines, vocab_size=2000, style="gemma")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(work / "gemma-spm" / "tokenizer.model"))
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=12, head_dim=64, query_pre_attn_scalar=64)
    shape |= dict(sliding_window=64, max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    gemma2 = model_type == "gemma2"
    if gemma2:
        shape |= dict(attn_logit_softcapping=5.0, final_logit_softcapping=1.0, tie_word_embeddings=True)
    model = make_tiny_causal_lm(model_type, len(tokenizer), **shape)
    # Every norm (q/k's too) scales by 1 + weight in 0.5..1.5: written without the shift, a norm would scale
    # by -0.5..0.5. (Sharper attention, q/k norms of 3 to 5, makes 12 random layers chaotic: 0.5 apart even
    # with a float32 KV cache, and as far for a model whose window spans the whole text.)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    source, _, llama = _exported(model, tokenizer, work / f"tiny-{model_type}")
    ids = tokenizer.encode(" ".join(TEXTS * 3), add_special_tokens=False)[:300]
    result = {
        "tokenization": _tokenization(tokenizer, llama),
        "same_ids_as_sentencepiece": sum(
            processor.encode(t) == llama.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS
        ),
        "logits": _compare_logits(model, llama, ids),
    }
    if gemma2:  # the control: transformers without the soft-caps, against the same file
        uncapped = copy.deepcopy(model)
        uncapped.config.attn_logit_softcapping = uncapped.config.final_logit_softcapping = None
        for layer in uncapped.model.layers:  # each attention took its cap from the config when built
            layer.self_attn.attn_logit_softcapping = None
        result["logits_against_no_soft_caps"] = _compare_logits(uncapped, llama, ids)
        return result
    # The control: the same export without the sliding window, which llama.cpp then runs as global attention
    # everywhere with the global rope base (the sliding layers' base comes with the window).
    unwindowed = work / "gemma3-no-window.gguf"
    with mock.patch.object(gguf.GGUFWriter, "add_sliding_window", lambda writer, window: None):
        export_gguf(model, source, unwindowed, "f32")
    result["logits_without_sliding_window"] = _compare_logits(model, _llama(unwindowed), ids)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-path", default=None, help="a directory where llama_cpp is installed")
    args = parser.parse_args(argv)
    if args.llama_cpp_path:
        sys.path.insert(0, args.llama_cpp_path)
    import llama_cpp
    from transformers import AutoTokenizer

    from .hub_tokenizers import GPT4O_PRE, LLAMA3_PRE, QWEN2_PRE, SMOLLM_PRE

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf_file = default_model()
        tokenizer_dir = work / "tokenizer"
        AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).save_pretrained(tokenizer_dir)
        figures = {
            "llama_cpp_python": llama_cpp.__version__,
            "smollm2_hub_pre": _smollm2(work, SMOLLM_PRE, "smollm2-hub"),
            "smollm2_as_converted": _smollm2(work, None, "smollm2-converted"),
            "tiny_llama3_rope_tied": _tiny(work, "llama3", tokenizer_dir, LLAMA3_PRE),
            "tiny_qwen2": _tiny(work, "qwen2", tokenizer_dir, QWEN2_PRE),
            "tiny_qwen3_wide_heads_tied": _tiny(work, "qwen3", tokenizer_dir, QWEN2_PRE),
            "tiny_smollm3_nope_tied": _tiny(work, "smollm3", tokenizer_dir, LLAMA3_PRE),
            "tiny_phi3_half_rope": _tiny(work, "phi3", tokenizer_dir, LLAMA3_PRE),
            "tiny_phi4_mini_longrope_gpt4o_pre": _tiny(work, "phi3_longrope", tokenizer_dir, GPT4O_PRE),
            "tiny_olmo2_post_norms": _tiny(work, "olmo2", tokenizer_dir, LLAMA3_PRE),
            "sentencepiece": _sentencepiece(work),
            "tiny_gemma3_sliding": _gemma(work),
            "tiny_gemma2_soft_capped": _gemma(work, "gemma2"),
        }
    print(json.dumps(figures, indent=1))
    print(f"saved {write_machine_results('gguf-hf-llamacpp', torch.get_num_threads(), figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
