"""A GGUF base's model config: what transformers' GGUF reader takes from the file, completed with what it
leaves out and llama.cpp reads, so the converted model is the one llama.cpp runs from the same file.

transformers 5 maps ``attention.key_length`` to ``head_dim`` for some architectures only (``qwen3_moe``,
``gemma3``, not ``qwen3``), elsewhere keeping the class default (128 for Qwen3); reads neither
``rope.dimension_count`` (Phi-4-mini turns 3/4 of each head) nor LongRoPE's factor tensors (Phi-3.5) for
``phi3``; neither Gemma 2's soft-caps nor either Gemma's query scale, which llama.cpp fixes by its own
rule (1/sqrt(head width), 1/sqrt(hidden / heads) for the 27Bs) where transformers keeps 256; nor Llama 3's
rope scaling, which llama.cpp's converter writes as a ``rope_freqs`` tensor of per-frequency divisors
(Llama 3.1, 3.2 and 3.3 GGUFs: without it transformers trains a model with another rope than the file's);
nor any linear rope scaling (Gemma 3 4B and up).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig


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
    if arch in ("gemma2", "gemma3"):
        _gemma_attention(config, arch, setting)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and setting(gguf.Keys.Rope.SCALING_TYPE) == "linear":
        # Linear rope scaling (Gemma 3 4B and up, on its global layers: llama.cpp scales no sliding layer).
        full = rope["full_attention"] if isinstance(rope.get("full_attention"), dict) else rope
        full.update(rope_type="linear", factor=float(setting(gguf.Keys.Rope.SCALING_FACTOR)))
    divisors = next((t.data for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if isinstance(rope, dict) and divisors is not None:
        _llama3_rope(config, rope, divisors)
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:  # transformers' Phi-3 rope
        factors = {t.name.split(".")[0]: t.data.tolist() for t in reader.tensors if t.name.startswith("rope_factors_")}
        _phi3_rope(config, rope, setting, factors)
    return config


def _width(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gemma_attention(config: PretrainedConfig, arch: str, setting) -> None:
    import gguf

    from ..gguf_hf import gemma_query_scalar

    config.query_pre_attn_scalar = gemma_query_scalar(config, arch)
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


def _llama3_rope(config: PretrainedConfig, rope: dict, divisors: Any) -> None:
    """Llama 3's rope scaling back from llama.cpp's ``rope_freqs`` (what divides each frequency).

    Between its two wavelength bounds the rule's divisor ``d`` gives ``smooth = (1/d - 1/factor) / (1 -
    1/factor)``, linear in 1/wavelength with slope ``original / (high - low)`` and intercept ``-low / (high -
    low)``; any (low, high, original) with those two gives the same divisors, so ``high - low`` is taken as
    Llama 3's 3. The result is checked by recomputing the divisors; a tensor the rule does not give is kept
    exactly as LongRoPE with equal short and long factors (transformers divides each frequency by them).
    """
    import numpy as np

    from ..gguf_hf import rope_factors

    divisors = np.asarray(divisors, dtype=np.float64)
    theta, width = float(rope.get("rope_theta", 10000.0)), _width(config)
    wavelength = 2 * np.pi * theta ** (np.arange(0, width, 2) / width)
    factor = float(divisors.max())
    if np.all(divisors == 1.0):  # no scaling at all: the rope transformers read is the file's
        return
    if factor > 1.0:
        smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
        between = (smooth > 1e-4) & (smooth < 1 - 1e-4)
        if between.sum() >= 2:
            slope, intercept = np.polyfit(1 / wavelength[between], smooth[between], 1)
            low, original = round(float(-3 * intercept), 4), round(float(3 * slope))
        elif between.sum() == 1:  # Llama 3's bounds (1, 4) through the one point
            low, original = 1.0, round(float((3 * smooth[between][0] + 1) * wavelength[between][0]))
        else:  # any original context between the last undivided and the first divided wavelength
            undivided = wavelength[smooth >= 1 - 1e-4]
            low, original = 1.0, round(float(4 * undivided.max())) + 1 if undivided.size else 8192
        llama3 = {"rope_type": "llama3", "rope_theta": theta, "factor": round(factor, 4), "low_freq_factor": low}
        llama3 |= {"high_freq_factor": low + 3, "original_max_position_embeddings": original}
        probe = copy.copy(config)
        probe.rope_parameters = llama3
        if np.allclose(rope_factors(probe, width), divisors, rtol=1e-4):
            rope.clear()
            rope.update(llama3)
            return
    rope.clear()
    rope.update(rope_type="longrope", rope_theta=theta, attention_factor=1.0)
    rope.update(short_factor=divisors.tolist(), long_factor=divisors.tolist())
    rope["original_max_position_embeddings"] = config.max_position_embeddings
