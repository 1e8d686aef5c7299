"""The GGUF metadata of a plain Hugging Face model directory, for ``gguf_export`` of a merge of it.

A merge of a GGUF base copies that file's metadata; a base that is a model directory (``config.json`` +
``tokenizer.json``) gets what llama.cpp's ``convert_hf_to_gguf.py`` derives from one: the architecture
settings from the config, and the tokenizer (``gguf_tokenizer.py``: byte-level BPE and SentencePiece BPE).

Llama (also Llama 3's rope scaling, written as ``rope_freqs`` as the converter does), Mistral (GGUF's
``llama`` architecture, as the converter writes it), Qwen2 and Qwen3 (its q/k norms are tensors the name
map knows). llama.cpp has no sliding window in these architectures, so a model that slides (Mistral,
a Qwen with ``use_sliding_window``) gets its window as the context length: within it, attention is the
same. Gemma 2 and Gemma 3 (text; ``gemma3_text``) have their sliding window in llama.cpp (and Gemma 2
its soft-capping), whose other settings are fixed there (``_check_gemma``); their norms are shifted by one
on writing (``gguf_export``). SmolLM3 is Llama with no rope at every fourth layer, which llama.cpp fixes
in its code too (``_check_smollm3``). Phi-3 (and Phi-4, also ``phi3``) keeps its fused projections; its
rope may turn a part of each head only; its sliding window is off in llama.cpp, so it too bounds the
context length; its LongRoPE (Phi-3.5, Phi-4-mini) is written as llama.cpp's factor tensors, within the
original context (``add_hf_fields``). An image-text model's directory gives its text decoder's settings.
Other rope scalings, settings and tokenizers are refused with the reason, never written wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from .gguf_tokenizer import add_tokenizer, read_tokenizer
from .model_sources import GGUF_MODEL_TYPES, GGUFExportError


def head_dim(config: Any) -> int:
    """The attention head width of a loaded config (set explicitly, or hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    # transformers 5 holds rope_theta and the scaling in ``rope_parameters`` (one per layer type where the
    # types differ: Gemma 3's); 4.x in two attributes.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
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


def rope_tensors(config: Any, head_dim: int) -> dict[str, np.ndarray]:
    """The rope settings llama.cpp takes as tensors: Llama 3's ``rope_freqs`` (:func:`rope_factors`), or
    LongRoPE's ``rope_factors_long`` and ``rope_factors_short`` (the config's factors as they are)."""
    params = _rope_parameters(config)
    if params["rope_type"] == "longrope":
        return {
            f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG]}.weight": _floats(params["long_factor"]),
            f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]}.weight": _floats(params["short_factor"]),
        }
    factors = rope_factors(config, head_dim)
    return {} if factors is None else {f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight": factors}


def _floats(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def add_hf_fields(writer: gguf.GGUFWriter, model_dir: Path, config: Any, name: str) -> None:
    """The settings and tokenizer of ``model_dir`` (``config``: its loaded config) into ``writer``.

    Raises:
        GGUFExportError: a tokenizer or rope scaling llama.cpp would not run as transformers does.
    """
    arch, params = _checked(config)
    gemma = arch in ("gemma2", "gemma3")
    n_head, width = config.num_attention_heads, head_dim(config)
    tokenizer = read_tokenizer(model_dir)
    writer.add_name(_loadable_name(name, tokenizer[1]))
    slides = config.model_type in ("mistral", "phi3") or getattr(config, "use_sliding_window", False)
    window = getattr(config, "sliding_window", None) if slides else None
    context = min(config.max_position_embeddings, window or config.max_position_embeddings)
    if params["rope_type"] == "longrope":
        # llama.cpp takes the long factors in a context longer than the original one, for every sequence;
        # transformers only for a sequence longer than that. Within the original context both take the
        # short ones, so that is the context written (a longer one is the user's choice, with that caveat).
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
        original = int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)
        context = min(context, original)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(float(attention))
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(width * params.get("partial_rotary_factor", 1.0)))
    if width != config.hidden_size // n_head or gemma:
        writer.add_key_length(width)
        writer.add_value_length(width)
    if gemma:
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))

    add_tokenizer(writer, model_dir, config.vocab_size, tokenizer)


# llama.cpp marks Phi-3's special tokens by the model's name (a ``general.name`` holding "phi-3" or "phi3", in
# any architecture), looking up these four: a vocabulary without one of them fails to load.
_PHI3_NAME = re.compile(r"(?i)(phi)-?(3)")
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _loadable_name(name: str, tokenizer: Tokenizer) -> str:
    """``name`` as the GGUF's ``general.name``: as it is, unless llama.cpp would take it for a Phi-3 whose
    tokens the vocabulary lacks (a directory named for Phi-3, a tokenizer that isn't); then ``phi_3``."""
    if not _PHI3_NAME.search(name):
        return name
    if all(tokenizer.token_to_id(token) is not None for token in _PHI3_TOKENS):
        return name
    return _PHI3_NAME.sub(r"\1_\2", name)


def _check_rope(rope_type: str, arch: str) -> None:
    # LongRoPE only where llama.cpp's architecture takes its factors: Phi-3's.
    written = ("default", "llama3", "linear", *(("longrope",) if arch == "phi3" else ()))
    if rope_type not in written:
        raise GGUFExportError(f"GGUF export writes no {rope_type!r} rope scaling in {arch} ({', '.join(written)})")


# llama.cpp's 27B Gemmas, known by their layer count: their queries are scaled by hidden size over heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_query_scalar(config: Any, arch: str) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's Gemma 2 or 3 runs with, whatever the file says: the head
    width, or hidden size over heads for the 27B."""
    if config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]:
        return config.hidden_size // config.num_attention_heads
    return head_dim(config)


def _check_gemma(config: Any, arch: str) -> None:
    """Refuse a Gemma 2 or 3 that llama.cpp would run otherwise than transformers: llama.cpp takes neither
    the layer pattern (Gemma 2: every other layer global; Gemma 3: every sixth), nor Gemma 3's sliding
    layers' rope, nor the query scale, nor (Gemma 2) whether logits are soft-capped from the file."""
    n_layers, problems = config.num_hidden_layers, []
    period = 2 if arch == "gemma2" else 6  # a global layer every ``period``
    pattern = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
    if list(getattr(config, "layer_types", None) or pattern) != pattern:
        problems.append(f"global attention at layers other than every {'other' if period == 2 else 'sixth'}")
    if arch == "gemma3":
        local = _rope_parameters(config, "sliding_attention")
        if local["rope_type"] != "default" or float(local["rope_theta"]) != 10000.0:
            problems.append(f"a sliding-layer rope other than the default with base 10000 ({local})")
    scalar = gemma_query_scalar(config, arch)
    if float(config.query_pre_attn_scalar) != scalar:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar}, not {scalar}")
    if not getattr(config, "sliding_window", None):  # llama.cpp slides, with the sliding layers' rope, only given one
        problems.append("no sliding_window")
    # Gemma 2 soft-caps in llama.cpp always, by the file's values; Gemma 3 never.
    capped = ("attn_logit_softcapping", "final_logit_softcapping")
    for flag in (*(() if arch == "gemma2" else capped), "use_bidirectional_attention"):
        if getattr(config, flag, None):
            problems.append(f"{flag} {getattr(config, flag)}")
    if arch == "gemma2":
        problems += [f"no {flag}" for flag in capped if not getattr(config, flag, None)]
        if not config.tie_word_embeddings:  # llama.cpp's Gemma 2 reads its head from the embedding
            problems.append("a head not tied to the embedding")
    if config.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"the activation {config.hidden_activation}, not gelu_pytorch_tanh")
    if problems:
        name = "Gemma 2" if arch == "gemma2" else "Gemma 3"
        raise GGUFExportError(f"GGUF export writes {name} as llama.cpp runs it; this one has {'; '.join(problems)}")


def _check_smollm3(config: Any) -> None:
    """Refuse a SmolLM3 whose rope-less layers are not llama.cpp's: every fourth, fixed in its code."""
    every_fourth = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
    if list(config.no_rope_layers) != every_fourth:
        raise GGUFExportError(
            "GGUF export writes SmolLM3 as llama.cpp runs it, without rope at every fourth layer only; this "
            f"one's no_rope_layers are {config.no_rope_layers}"
        )


def _checked(config: Any) -> tuple[str, dict[str, Any]]:
    """The GGUF architecture and the (full-attention) rope parameters of ``config``, once its rope scaling
    and what llama.cpp fixes in its code for the architecture are checked against it.

    Raises:
        GGUFExportError: an architecture, rope scaling or fixed setting GGUF export does not write.
    """
    arch, params = hf_architecture(config), _rope_parameters(config)
    _check_rope(params["rope_type"], arch)
    if arch in ("gemma2", "gemma3"):
        _check_gemma(config, arch)
    elif arch == "smollm3":
        _check_smollm3(config)
    return arch, params


def check_source(model_dir: Path) -> None:
    """What :func:`add_hf_fields` would refuse in ``model_dir``, found before a merge spends its time on it.

    Raises:
        GGUFExportError: a tokenizer, rope scaling or architecture setting GGUF export does not write.
    """
    from transformers import AutoConfig

    _checked(AutoConfig.from_pretrained(model_dir).get_text_config())  # the config file alone: milliseconds
    read_tokenizer(model_dir)


def hf_architecture(config: Any) -> str:
    """The GGUF architecture of a loaded config.

    Raises:
        GGUFExportError: one we don't write.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_MODEL_TYPES:
        raise GGUFExportError(f"GGUF export writes {list(GGUF_MODEL_TYPES)} model directories, not {model_type!r}")
    return GGUF_MODEL_TYPES[model_type]
