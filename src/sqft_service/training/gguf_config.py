"""A GGUF base's model config: what transformers' GGUF reader takes from the file, completed with what it
leaves out and llama.cpp reads, so the converted model is the one llama.cpp runs from the same file.

transformers 5 maps ``attention.key_length`` to ``head_dim`` for some architectures only (``qwen3_moe``,
``gemma3``, not ``qwen3``), elsewhere keeping the class default (128 for Qwen3); reads neither
``rope.dimension_count`` (Phi-4-mini turns 3/4 of each head) nor LongRoPE's factor tensors (Phi-3.5) for
``phi3``; and neither Gemma 2's soft-caps nor either Gemma's query scale, which llama.cpp fixes by its own
rule (1/sqrt(head width), 1/sqrt(hidden / heads) for the 27Bs) where transformers keeps 256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# llama.cpp's 27B Gemmas by layer count: their queries are scaled by hidden size over heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_config(gguf_path: Path) -> PretrainedConfig:
    """The model config of ``gguf_path``, as llama.cpp would run the file."""
    import gguf

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def setting(key: str) -> Any:
        field = reader.fields.get(key.format(arch=arch))
        return None if field is None else field.contents()

    key_length = setting(gguf.Keys.Attention.KEY_LENGTH)
    if key_length is not None and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = int(key_length)
    if arch in _GEMMA_27B_LAYERS:
        _gemma_attention(config, arch, setting)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:  # transformers' Phi-3 rope
        factors = {t.name.split(".")[0]: t.data.tolist() for t in reader.tensors if t.name.startswith("rope_factors_")}
        _phi3_rope(config, rope, setting, factors)
    return config


def _width(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gemma_attention(config: PretrainedConfig, arch: str, setting) -> None:
    import gguf

    big = config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]
    config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if big else _width(config)
    for key, name in (
        (gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING, "attn_logit_softcapping"),
        (gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING, "final_logit_softcapping"),
    ):
        if (value := setting(key)) is not None:
            setattr(config, name, float(value))


def _phi3_rope(config: PretrainedConfig, rope: dict, setting, factors: dict[str, list[float]]) -> None:
    import gguf

    rope_dims = setting(gguf.Keys.Rope.DIMENSION_COUNT)
    if rope_dims is not None:
        rope["partial_rotary_factor"] = int(rope_dims) / _width(config)
    if factors:
        # llama.cpp takes the short factors within the original context, the long ones beyond it, and
        # multiplies both by the file's attention factor, as transformers' longrope does by sequence length.
        original = int(setting(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN) or config.max_position_embeddings)
        config.original_max_position_embeddings = original
        rope.update(
            rope_type="longrope",
            short_factor=factors["rope_factors_short"],
            long_factor=factors["rope_factors_long"],
            attention_factor=float(setting(gguf.Keys.Rope.SCALING_ATTN_FACTOR) or 1.0),
            original_max_position_embeddings=original,
        )
