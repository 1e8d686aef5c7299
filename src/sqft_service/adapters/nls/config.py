"""``elastic_adapter_config.json`` and the choice of a sub-adapter from it (SQFT, Sec. 3.1).

After NLS training, the reference service picks a sub-adapter by name: ``maximal`` (the first rank of
every space), ``heuristic`` (the middle rank, ``space[(len - 1) // 2]``, e.g. 12 of ``16,12,8``),
``minimal`` (the last rank) or an explicit ``custom_config`` with one rank per search dimension in
group-major order (e.g. 66 values = 3 groups x 22 layers for the README's example).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...config import LoraSection
from ...workspace import ELASTIC_CONFIG_FILE
from .controller import ElasticRankController

ORDER_DOC = (
    "group-major: dimension index = group * n_layers + layer position; all decoder layers of "
    "target_module_groups[0] first, then group 1, ...; custom_config lists one rank per dimension "
    "in this order"
)


def elastic_adapter_config(controller: ElasticRankController, lora: LoraSection) -> dict[str, Any]:
    """Describe the search dimensions of a trained super-adapter.

    Args:
        controller: The NLS controller of the trained model.
        lora: The ``General.lora_config`` section it was built from.

    Returns:
        A JSON-serialisable dict: max rank ``r``, ``lora_alpha``, the groups and search-space strings,
        the order doc and the ordered list of dimensions.
    """
    groups = [list(g) for g in lora.target_module_groups or controller.groups]
    return {
        "r": controller.max_rank,
        "lora_alpha": lora.lora_alpha,
        "target_module_groups": groups,
        "search_space": list(lora.search_space or []),
        "order": ORDER_DOC,
        "n_layers": len({d.layer for d in controller.dimensions}),
        "dimensions": [
            {
                "index": d.index,
                "layer": d.layer,
                "group": d.group,
                "group_modules": groups[d.group],
                "modules": list(d.modules),
                "space": list(d.space),
            }
            for d in controller.dimensions
        ],
    }


def write_elastic_adapter_config(controller: ElasticRankController, lora: LoraSection, directory: str | Path) -> Path:
    """Write ``elastic_adapter_config.json`` into ``directory`` (beside the saved super-adapter)."""
    path = Path(directory) / ELASTIC_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(elastic_adapter_config(controller, lora), indent=2))
    return path


def select_ranks(config_json: dict[str, Any], version: str, custom_config: list[int] | None = None) -> list[int]:
    """The rank of every dimension for a named sub-adapter.

    Args:
        config_json: The content of ``elastic_adapter_config.json``.
        version: ``maximal``, ``heuristic``, ``minimal`` or any other name (then ``custom_config``).
        custom_config: One rank per dimension (group-major) for a custom version.

    Returns:
        The ranks, one per dimension.

    Raises:
        ValueError: If a custom version lacks ``custom_config``, it has the wrong length, or a value is
            outside its dimension's search space.
    """
    dims = config_json["dimensions"]
    spaces = [list(d["space"]) for d in dims]
    if version == "maximal":
        return [s[0] for s in spaces]
    if version == "heuristic":
        return [s[(len(s) - 1) // 2] for s in spaces]
    if version == "minimal":
        return [s[-1] for s in spaces]
    n_groups = len(config_json.get("target_module_groups") or {d["group"] for d in dims})
    n_layers = config_json.get("n_layers") or len({d["layer"] for d in dims})
    if custom_config is None:
        raise ValueError(
            f"sub-adapter version {version!r} is not maximal/heuristic/minimal: give custom_config "
            f"with {len(dims)} values (groups x layers = {n_groups} x {n_layers})"
        )
    if len(custom_config) != len(dims):
        raise ValueError(
            f"custom_config has {len(custom_config)} values, expected {len(dims)} values = "
            f"groups x layers = {n_groups} x {n_layers} (group-major order)"
        )
    for i, (value, d) in enumerate(zip(custom_config, dims, strict=True)):
        if value not in d["space"]:
            raise ValueError(
                f"custom_config[{i}] = {value} is not in the search space {d['space']} of dimension {i} "
                f"(layer {d['layer']}, group {d['group']})"
            )
    return [int(v) for v in custom_config]
