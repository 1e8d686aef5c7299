"""Wrap a causal LM with a stock PEFT LoRA adapter, plus the SQFT extras (NLS, SparsePEFT, QA-SparsePEFT).

Everything here runs on unpatched ``peft``: the adapter is created with ``peft.get_peft_model`` and a
plain ``LoraConfig``; NLS (elastic ranks) and SparsePEFT are attached afterwards by
:mod:`sqft_service.adapters.nls` and :mod:`sqft_service.adapters.sparse` without changing what
``save_pretrained`` writes, so every checkpoint is a standard PEFT LoRA adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import LoraSection
from ..errors import InvalidConfigurationError
from .dropout import share_lora_dropout
from .fused_lora import fuse_lora_layers
from .nls import ElasticRankController
from .peft_utils import language_model_linears, language_model_path, matches_module
from .qa import QuantAwareAdapter, QuantSettingError, enable_quantization_aware
from .sparse import SparseAdapter, enable_sparse_peft

# The attention and MLP projections of Llama-style decoders (SQFT's default targets), with the fused ones
# of Phi-3-style decoders (q/k/v as one ``qkv_proj``, gate and up as one ``gate_up_proj``).
PROJECTION_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
)


class AdapterConfigError(InvalidConfigurationError):
    """A LoRA (or other job) setting that does not fit the model; ``param`` names the config field.

    Args:
        message: What is wrong, for the user.
        param: The config field at fault (also accepted positionally, as existing raise sites pass it).
        code: Overrides the ``invalid_configuration`` code.
    """

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


@dataclass
class AdapterHandles:
    """The optional SQFT controllers of one PEFT model, for the training loop.

    Attributes:
        nls: The elastic-rank controller (call ``nls.sample(step)`` before each step and
            ``nls.record_loss(loss)`` after it), or ``None`` without Neural Low-rank Adapter Search.
        sparse: The SparsePEFT handle (masks of the sparse base), or ``None``.
        quant: The QA-SparsePEFT handle (the base's quantizers; saved beside the adapter), or ``None``.
    """

    nls: ElasticRankController | None = None
    sparse: SparseAdapter | None = None
    quant: QuantAwareAdapter | None = None


def _linear_leaf_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for name in language_model_linears(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention and MLP projection names the model's language model has (SQFT targets all of them).

    Args:
        model: The base causal LM.

    Returns:
        The subset of :data:`PROJECTION_NAMES` present as ``nn.Linear`` leaves of the language model
        (``peft_utils.language_model_linears``), in canonical order; if none is present, every
        ``nn.Linear`` leaf name of it.
    """
    leaves = _linear_leaf_names(model)
    found = [n for n in PROJECTION_NAMES if n in leaves]
    return found or leaves


def _head_names(model: nn.Module) -> list[str]:
    """The full name of the output head (a target entry may name it too), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if m is head and n]


def check_target_modules(model: nn.Module, names: list[str], param: str = "General.lora_config.target_modules"):
    """Raise :class:`AdapterConfigError` naming the first entry that matches no linear layer of the
    language model (or the output head).

    Args:
        model: The base causal LM.
        names: Target module names (PEFT list semantics: full name or dotted suffix).
        param: The config field reported in the error.

    Raises:
        AdapterConfigError: If some name matches no such ``nn.Linear`` of ``model``.
    """
    linear = [*language_model_linears(model), *_head_names(model)]
    for key in names:
        if not any(matches_module(n, key) for n in linear):
            have = ", ".join(_linear_leaf_names(model))
            raise AdapterConfigError(
                f"target module {key!r} matches no linear layer of the model (it has: {have})", param
            )


def _outside_language_model(model: nn.Module, targets: list[str]) -> str | None:
    """PEFT's ``exclude_modules`` (a regex on full names) for everything but the language model and the
    head, if ``targets`` match a linear elsewhere (an image-text model's vision tower, whose q/k/v share
    the decoder's names); None otherwise, so text-only models' adapter configs stay as they were."""
    allowed = {*language_model_linears(model), *(heads := _head_names(model))}
    if not any(
        isinstance(module, nn.Linear) and name not in allowed and any(matches_module(name, t) for t in targets)
        for name, module in model.named_modules()
    ):
        return None
    spared = [re.escape(f"{language_model_path(model)}."), *(re.escape(n) + "$" for n in heads)]
    return f"(?!{'|'.join(spared)}).*"


def build_peft_model(model: nn.Module, lora: LoraSection, seed: int = 0) -> tuple[PeftModel, AdapterHandles]:
    """Freeze ``model`` and wrap it with a stock PEFT LoRA adapter; attach NLS / SparsePEFT if asked.

    Args:
        model: The base causal LM (modified in place by PEFT: its linears become ``lora.Linear``).
        lora: The ``General.lora_config`` section.
        seed: Seed of the NLS sub-adapter sampler (all workers must pass the same one).

    Returns:
        The PEFT model and the :class:`AdapterHandles` of the enabled SQFT features.

    Raises:
        AdapterConfigError: If a target module matches no linear layer.
    """
    targets = lora.resolved_target_modules()
    param = (
        "General.lora_config.target_module_groups" if lora.neural_lora_search else "General.lora_config.target_modules"
    )
    if targets:
        check_target_modules(model, targets, param)
    else:
        targets = default_target_modules(model)
    model.requires_grad_(False)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=list(targets),
        exclude_modules=_outside_language_model(model, list(targets)),
    )
    peft_model = get_peft_model(model, config)
    share_lora_dropout(peft_model)
    handles = AdapterHandles()
    if lora.neural_lora_search:
        handles.nls = ElasticRankController(
            peft_model,
            groups=[list(g) for g in lora.target_module_groups or []],
            spaces=lora.parsed_search_space(),
            max_rank=lora.r,
            seed=seed,
        )
    if lora.quantization_aware:
        try:
            handles.quant = enable_quantization_aware(peft_model, lora.quantization_bits, lora.quantization_group_size)
        except QuantSettingError as exc:
            raise AdapterConfigError(str(exc), param=f"General.lora_config.{exc.param}") from None
        handles.sparse = handles.quant.sparse
    elif lora.sparse_adapter:
        handles.sparse = enable_sparse_peft(peft_model)
    else:
        fuse_lora_layers(peft_model)
    return peft_model, handles
