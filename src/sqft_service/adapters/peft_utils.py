"""Small PEFT helpers shared by the adapter methods (LoRA, NLS, SparsePEFT, merge, pruning).

* :func:`base_of` / :func:`lora_layers`: reach the wrapped model and its LoRA layers;
* :func:`matches_module`: PEFT's list semantics for module names (full name or dotted suffix);
* :func:`layer_index`: the decoder layer a module path belongs to;
* :func:`check_rank`: the ``1 <= rank <= max_rank`` check of a LoRA rank, with one error wording.

torch and peft are not imported at module level: ``sqft_service.config`` (which promises to import
neither) uses :func:`check_rank`, and the API imports that config on every request.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft.tuners.lora.layer import LoraLayer
    from torch import nn

# A path component that is all digits: the index of a module inside a ModuleList (``layers.3``).
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def base_of(peft_model: nn.Module) -> nn.Module:
    """The wrapped transformers model of a ``PeftModel`` (module names there are PEFT's keys).

    Args:
        peft_model: A ``PeftModel``.

    Returns:
        ``peft_model.base_model.model``; a missing ``base_model`` or ``model`` level is skipped, so a
        module that has neither comes back unchanged.
    """
    inner = getattr(peft_model, "base_model", peft_model)
    return getattr(inner, "model", inner)


def lora_layers(peft_model: nn.Module, adapter: str) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer that carries ``adapter``, in module order.

    Args:
        peft_model: A ``PeftModel``.
        adapter: The PEFT adapter name (e.g. ``"default"``).

    Returns:
        ``(name, layer)`` pairs; names are relative to :func:`base_of` (as PEFT's patterns see them).
    """
    from peft.tuners.lora.layer import LoraLayer

    return [
        (name, module)
        for name, module in base_of(peft_model).named_modules()
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {})
    ]


def language_model_path(model: nn.Module) -> str | None:
    """The module path of ``model``'s language model: ``model`` in a causal LM, ``model.language_model`` in
    an image-text model (Gemma 3's); None for a model without ``get_decoder``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return next((name for name, module in model.named_modules() if module is decoder and name), None)


def language_model_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model``'s language model (:func:`language_model_path`), by full name.

    A causal LM's whole body (not ``lm_head``); an image-text model's text decoder only: its vision tower
    and projector see no text training data, so adapters, pruning and quantization leave them as they
    are. A model without ``get_decoder``: every linear but ``lm_head``.
    """
    from torch import nn

    prefix = language_model_path(model)
    inside = (lambda name: name.startswith(f"{prefix}.")) if prefix else (lambda name: name != "lm_head")
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and inside(n)}


def matches_module(name: str, key: str) -> bool:
    """Whether module ``name`` is targeted by ``key`` under PEFT's list semantics.

    PEFT's list form of ``target_modules`` matches the full name or a dotted suffix
    (``peft.tuners.tuners_utils.check_target_module_exists``): ``"self_attn.q_proj"`` matches
    ``model.layers.0.self_attn.q_proj`` but ``"proj"`` does not match ``q_proj``.

    Args:
        name: A full module name.
        key: A target-module entry.

    Returns:
        ``True`` if ``name`` equals ``key`` or ends with ``"." + key``.
    """
    return name == key or name.endswith("." + key)


def layer_index(name: str) -> int | None:
    """The decoder layer of a module path: its first all-digit component.

    Args:
        name: A module path, e.g. ``model.layers.3.mlp.up_proj``.

    Returns:
        The index (``3`` above), or ``None`` if no component is all digits (``lm_head``).
    """
    match = _LAYER_RE.search(name)
    return None if match is None else int(match.group(1))


def check_rank(rank: int, max_rank: int, what: str, *, max_name: str | None = None, note: str = "") -> int:
    """Check that a LoRA rank lies in ``[1, max_rank]``.

    Args:
        rank: The rank to check.
        max_rank: The largest allowed rank (a super-adapter's ``r``).
        what: Names the value in the error, e.g. ``"`search_space[0]`"``.
        max_name: Names ``max_rank`` in the error (``[1, r=8]`` rather than ``[1, 8]``).
        note: Appended to the error message (start it with a space).

    Returns:
        ``rank``, so a caller can check and use it in one expression.

    Raises:
        ValueError: ``"<what> has rank <rank>, outside [1, <max>]<note>"`` if it does not fit.
    """
    if not 1 <= rank <= max_rank:
        bound = f"{max_name}={max_rank}" if max_name else str(max_rank)
        raise ValueError(f"{what} has rank {rank}, outside [1, {bound}]{note}")
    return rank
