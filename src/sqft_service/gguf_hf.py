"""The GGUF metadata of a plain Hugging Face model directory, for ``gguf_export`` of a merge of it.

A merge of a GGUF base copies that file's metadata; a base that is a model directory (``config.json`` +
``tokenizer.json``) gets what llama.cpp's ``convert_hf_to_gguf.py`` derives from one: the architecture
settings from the config, and the tokenizer as GGUF's ``gpt2`` (byte-level BPE) model: every id's token
and type, the merges, the special ids, ``add_bos``/``add_eos``, the chat template (``gguf.SpecialVocab``)
and the name of the pre-tokenizer, which llama.cpp runs from its own table of regexes and so must
recognise. Written here because that converter is a script, not a package, and it needs the original
hub directory (it names the pre-tokenizer by hashing the tokenization of a probe text, per hub model);
we name it by what the pre-tokenizer does (:func:`pre_tokenizer_name`).

Llama (also Llama 3's rope scaling, written as ``rope_freqs`` as the converter does) and Qwen2, with
byte-level BPE tokenizers: SentencePiece tokenizers (Llama 2, Mistral) and other rope scalings are
refused with the reason, never written wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers

from .model_sources import GGUF_MODEL_TYPES, GGUFExportError

# The Split patterns of Llama 3's and Qwen2's tokenizer.json (the pre-tokenizers llama.cpp calls
# "llama-bpe" and "qwen2"); Qwen2's differs in splitting every digit instead of runs of up to three.
# (transformers' GGUF tokenizer loader holds the same two, privately, for the other direction.)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# llama.cpp's name for each pre-tokenizer it implements that a byte-level BPE tokenizer.json can hold.
_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}
# Text that tells those pre-tokenizers apart: contractions in both cases, runs of digits, punctuation
# before letters, newlines after punctuation, runs of spaces, non-Latin letters and an emoji.
_PROBE = "I'm sure it's 12345 or 3.14, isn't it?\n\n  \t Don'T  'Ve\r\n...\n(x)=y+1;  über 東京 12 🚀 a1b22c333\n   \n"


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer`` (the one that splits the probe alike).

    Raises:
        GGUFExportError: no pre-tokenizer llama.cpp implements splits text as this one does.
    """
    if tokenizer.pre_tokenizer is None:
        raise GGUFExportError("the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(_PROBE)
    for name, make in _PRE_TOKENIZERS.items():
        if make().pre_tokenize_str(_PROBE) == pieces:
            return name
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer splits text unlike any llama.cpp implements for byte-level BPE "
        f"({', '.join(_PRE_TOKENIZERS)}): convert this merge with llama.cpp's convert_hf_to_gguf.py"
    )


def _read_tokenizer(model_dir: Path) -> tuple[dict[str, Any], Tokenizer]:
    """``tokenizer.json`` (read once) as its JSON and as the tokenizer, if GGUF export writes it.

    Raises:
        GGUFExportError: not a byte-level BPE tokenizer, or one that normalizes text.
    """
    text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(text)
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2); this model's "
            f"tokenizer.json is a {model.get('type')!r} model with a {decoder.get('type')!r} decoder"
        )
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp normalizes nothing; NFC (Qwen2's) changes no typed text
        raise GGUFExportError(f"the tokenizer normalizes text ({normalizer}), which llama.cpp would not do")
    return data, Tokenizer.from_str(text)


def head_dim(config: Any) -> int:
    """The attention head width of a loaded config (set explicitly, or hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _tokens(data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Every id's token and type, as llama.cpp's converter lists them: added special tokens CONTROL, other
    added tokens USER_DEFINED, ids the tokenizer lacks (an embedding padded to a round size) UNUSED."""
    by_id = {int(i): token for token, i in data["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in data.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_parameters(config: Any) -> dict[str, Any]:
    # transformers 5 holds rope_theta and the scaling in ``rope_parameters``; 4.x in two attributes.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_factors(config: Any, head_dim: int) -> np.ndarray | None:
    """Llama 3's rope scaling as llama.cpp's ``rope_freqs`` tensor: the factor that divides each
    frequency (transformers' own scaled frequencies against the unscaled ones), or None without it."""
    params = _rope_parameters(config)
    if params["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    plain = 1.0 / (float(params["rope_theta"]) ** exponents)
    return (plain / scaled.float()).numpy().astype(np.float32)


def add_hf_fields(writer: gguf.GGUFWriter, model_dir: Path, config: Any, name: str) -> None:
    """The settings and tokenizer of ``model_dir`` (``config``: its loaded config) into ``writer``.

    Raises:
        GGUFExportError: a tokenizer or rope scaling llama.cpp would not run as transformers does.
    """
    params = _rope_parameters(config)
    _check_rope(params["rope_type"])
    n_head, width = config.num_attention_heads, head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(width)
    if width != config.hidden_size // n_head:
        writer.add_key_length(width)
        writer.add_value_length(width)
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))

    data, tokenizer = _read_tokenizer(model_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_add_space_prefix(False)  # every pre-tokenizer named above splits "I" without a leading space
    tokens, types = _tokens(data, config.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    # What encoding adds, as the tokenizer does it (its post-processor), whatever tokenizer_config.json says:
    # llama.cpp's own default differs by pre-tokenizer.
    special.add_special_token = _adds_special(tokenizer, special)
    special.add_to_gguf(writer, quiet=True)


def _adds_special(tokenizer: Tokenizer, special: gguf.SpecialVocab) -> dict[str, bool]:
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    added = {"bos": bos is not None and len(ids) > len(plain) and ids[0] == bos}
    if eos is not None and len(ids) > len(plain) and ids[-1] == eos:  # rare: written only when it does
        added["eos"] = True
    return added


def _check_rope(rope_type: str) -> None:
    if rope_type not in ("default", "llama3", "linear"):
        raise GGUFExportError(f"GGUF export writes no {rope_type!r} rope scaling (default, llama3, linear)")


def check_source(model_dir: Path) -> None:
    """What :func:`add_hf_fields` would refuse in ``model_dir``, found before a merge spends its time on it.

    Raises:
        GGUFExportError: a tokenizer or rope scaling GGUF export does not write.
    """
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5's name, and 4's (read by 5 too)
        if isinstance(params := config.get(key), dict):
            _check_rope(params.get("rope_type", params.get("type", "default")))
    pre_tokenizer_name(_read_tokenizer(model_dir)[1])


def hf_architecture(config: Any) -> str:
    """The GGUF architecture of a loaded config.

    Raises:
        GGUFExportError: one we don't write.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_MODEL_TYPES:
        raise GGUFExportError(f"GGUF export writes {list(GGUF_MODEL_TYPES)} model directories, not {model_type!r}")
    return model_type
