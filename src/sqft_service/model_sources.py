"""Where a base model came from: the GGUF file behind a model reference (stdlib only, for the API too).

A job's ``model`` is a ``.gguf`` file, a model directory, or a sparse model that ``sparsify`` pruned from
one of those (its ``sparsity_report.json`` records the ``source_model``). A GGUF export of a merge copies
the tokenizer and settings of that file, so it needs the chain to end in one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

# What a merge's GGUF export writes its weights in (other than a QA-SparsePEFT layer's integers).
GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)


class GGUFExportError(ValueError):
    """The model can't be written as GGUF (no source GGUF, an architecture we don't write, a mismatch)."""


NO_SOURCE_GGUF = (
    "a GGUF export copies the tokenizer and settings of the GGUF file the base model came from; this job's "
    "base is neither a .gguf file nor a model sparsified from one"
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
