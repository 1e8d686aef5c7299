"""The GGUF metadata of a plain Hugging Face model directory, for ``gguf_export`` of a merge of it.

A merge of a GGUF base copies that file's metadata; a base that is a model directory (``config.json`` +
``tokenizer.json``) gets what llama.cpp's ``convert_hf_to_gguf.py`` derives from one: the architecture
settings from the config, and the tokenizer (``gguf_tokenizer.py``: byte-level BPE and SentencePiece BPE).

Llama (also Llama 3's rope scaling, written as ``rope_freqs`` as the converter does), Mistral (GGUF's
``llama`` architecture, as the converter writes it; llama.cpp has no sliding window there, so the context
length written is the window: within it, attention is the same) and Qwen2. Other rope scalings and
tokenizers are refused with the reason, never written wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .gguf_tokenizer import add_tokenizer, read_tokenizer
from .model_sources import GGUF_MODEL_TYPES, GGUFExportError


def head_dim(config: Any) -> int:
    """The attention head width of a loaded config (set explicitly, or hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    writer.add_context_length(min(config.max_position_embeddings, window or config.max_position_embeddings))
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

    add_tokenizer(writer, model_dir, config.vocab_size)


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
