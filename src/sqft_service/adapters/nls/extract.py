"""Cut a sub-adapter out of an NLS super-adapter as a standard PEFT LoRA checkpoint.

A sub-adapter with rank ``r'`` in some module is ``A[:r']`` and ``B[:, :r']`` of the super-adapter,
used with the super-adapter's scaling ``lora_alpha / r`` (SQFT trains slices, not rescaled adapters).
Stock PEFT expresses per-module ranks with ``rank_pattern`` and per-module scaling with
``alpha_pattern`` (scaling = alpha / rank), so each module gets ``r'`` and ``alpha' = r' * lora_alpha / r``.

PEFT 0.21 resolves pattern keys with ``re.match(rf"(.*\\.)?({key})$", module_name)``
(``peft.utils.other.get_pattern_key``): keys are regexes anchored at the end and at a dot boundary.
We use the escaped full module path (``model\\.layers\\.1\\.self_attn\\.q_proj``), which matches exactly
one module: ``layers.1`` can't match ``layers.11`` (the dot boundary) nor another layer's module.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..peft_utils import check_rank
from .config import ELASTIC_CONFIG_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's saved keys: "base_model.model." + module name + ".lora_A.weight" (adapter name stripped).
_PREFIX = "base_model.model."


def extract_sub_adapter(super_adapter_dir: str | Path, output_dir: str | Path, ranks: list[int]) -> dict[str, Any]:
    """Write the sub-adapter with the given per-dimension ranks as a stock PEFT LoRA adapter.

    Args:
        super_adapter_dir: A saved super-adapter (``adapter_config.json``,
            ``adapter_model.safetensors`` and ``elastic_adapter_config.json``).
        output_dir: Where the sub-adapter goes (created; ``PeftModel.from_pretrained`` loads it).
        ranks: One rank per search dimension, group-major (see ``select_ranks``).

    Returns:
        A summary: ``path``, ``ranks``, per-dimension details and ``n_params``.

    Raises:
        ValueError: If ``ranks`` does not fit the search dimensions, or a module's weights are missing.
    """
    src, out = Path(super_adapter_dir), Path(output_dir)
    elastic = json.loads((src / ELASTIC_CONFIG_FILE).read_text())
    adapter_config = json.loads((src / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    dims = elastic["dimensions"]
    max_rank = int(adapter_config["r"])
    alpha = float(adapter_config["lora_alpha"])
    if len(ranks) != len(dims):
        raise ValueError(f"expected {len(dims)} ranks (one per search dimension), got {len(ranks)}")

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    new_tensors = dict(tensors)
    for dim, rank in zip(dims, ranks, strict=True):
        rank = check_rank(int(rank), max_rank, f"ranks[{dim['index']}]")
        for module in dim["modules"]:
            a_key, b_key = f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"
            if a_key not in tensors or b_key not in tensors:
                raise ValueError(f"the super-adapter has no LoRA weights for module {module!r}")
            new_tensors[a_key] = tensors[a_key][:rank].contiguous()
            new_tensors[b_key] = tensors[b_key][:, :rank].contiguous()
            key = re.escape(module)
            rank_pattern[key] = rank
            alpha_pattern[key] = rank * alpha / max_rank

    top = max(int(r) for r in ranks)
    adapter_config.update(
        r=top,
        lora_alpha=top * alpha / max_rank,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(new_tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    # training_config.json says how the super-adapter trained (e.g. SparsePEFT: served and evaluated masked);
    # a QA-SparsePEFT super-adapter's quantizers serve every sub-adapter.
    from ..qa.peft import QUANT_FILE  # here: adapters.qa imports nls (through sparse)

    for extra in ("README.md", "training_config.json", QUANT_FILE):
        if (src / extra).is_file() and src.resolve() != out.resolve():
            shutil.copy(src / extra, out / extra)
    summary = {
        "path": str(out),
        "ranks": [int(r) for r in ranks],
        "dimensions": [
            {"index": d["index"], "layer": d["layer"], "group": d["group"], "rank": int(r)}
            for d, r in zip(dims, ranks, strict=True)
        ],
        "n_params": int(sum(t.numel() for t in new_tensors.values())),
        "max_rank": max_rank,
    }
    (out / "sub_adapter.json").write_text(json.dumps(summary, indent=2))
    return summary
