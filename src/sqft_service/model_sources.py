"""Where a base model came from, for a GGUF export of its merge (stdlib only, for the API too).

A job's ``model`` is a ``.gguf`` file, a model directory, or a sparse model that ``sparsify`` pruned from
one of those (its ``sparsity_report.json`` records the ``source_model``). A GGUF export of a merge copies
the tokenizer and settings of the GGUF file that chain ends in; failing one, it derives them from the
base's own directory when that holds a ``config.json`` of an architecture we write and a ``tokenizer.json``
(``gguf_hf.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

# What a merge's GGUF export writes its weights in (other than a QA-SparsePEFT layer's integers).
GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)


class GGUFExportError(ValueError):
    """The model can't be written as GGUF (no source GGUF, an architecture we don't write, a mismatch)."""


# The Hugging Face ``model_type``s a model directory's export is written for, and their GGUF architectures.
GGUF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    # Qwen2-VL's and Qwen2.5-VL's decoders: a Qwen2's, whose multimodal rotary positions are plain ones
    # for text (a token's time, row and column all its index).
    "qwen2_vl_text": "qwen2",
    "qwen2_5_vl_text": "qwen2",
    "qwen3": "qwen3",
    "qwen3_vl_text": "qwen3",  # Qwen3-VL's decoder: deepstack features are added at image tokens only
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "smollm3": "smollm3",
    "phi3": "phi3",
    "olmo2": "olmo2",
}

NO_SOURCE_GGUF = (
    "a GGUF export takes the tokenizer and settings from the GGUF file the base model came from, or from "
    "the base's directory (config.json of a Llama, Mistral or Qwen2 model, and tokenizer.json); this job's "
    "base has neither"
)


def source_gguf(model: str) -> Path | None:
    """The GGUF file ``model`` is or was pruned from, if it still exists."""
    seen: set[str] = set()
    while model and model not in seen:
        seen.add(model)
        path = Path(model)
        if path.suffix == ".gguf":
            return path if path.is_file() else None
        report = path / "sparsity_report.json"
        if not report.is_file():
            return None
        try:
            model = str(json.loads(report.read_text()).get("source_model") or "")
        except (OSError, ValueError, AttributeError):
            return None
    return None


def hf_export_dir(model: str) -> Path | None:
    """``model`` if it is a model directory a GGUF export can take its metadata from (``gguf_hf.py``)."""
    path = Path(model)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    # An image-text model (Gemma 3 4B and up) exports its text decoder: its text_config says which.
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    known = text.get("model_type") in GGUF_MODEL_TYPES
    return path if known and (path / "tokenizer.json").is_file() else None


def export_source(model: str) -> Path | None:
    """Where a GGUF export of a merge of ``model`` takes its metadata: the GGUF it came from, else its directory."""
    return source_gguf(model) or hf_export_dir(model)
