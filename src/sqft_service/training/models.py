"""Where base models come from: a local Hugging Face directory, a ``.gguf`` file, or a hub id.

GGUF files are de-quantized by transformers (through the ``gguf`` package) into an ordinary
fp32 model. That conversion takes tens of seconds for a 135M model (mostly the tokenizer), so
the result is cached once as a plain safetensors directory keyed by the file's identity; every
later job loads the cache in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters.qa.gptq import attach_quantized_base
from ..errors import UserError
from .gguf_config import gguf_config

log = logging.getLogger(__name__)


class ModelLoadError(UserError):
    """The base model or its tokenizer cannot be loaded; the message is meant for the user.

    A :class:`~sqft_service.errors.UserError` (so also a ``ValueError``): the model reference is the
    client's input, so the API reports it as ``invalid_model`` on ``model`` rather than a server error.
    """

    code = "invalid_model"
    param = "model"


def clear_gguf_quantization_flag(model: PreTrainedModel) -> None:
    """A GGUF-loaded model is flagged as quantized although its weights are plain tensors.

    ``Trainer`` and ``save_pretrained`` refuse quantized models; the flag lives in
    ``hf_quantizer`` and ``config.quantization_config`` (transformers ``modeling_utils``).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


# Bumped when a conversion would now come out otherwise (2: the head and rope widths, LongRoPE, Llama 3's
# rope, Gemma's query scale and soft-caps, from the file: ``gguf_config``), so an older cache is not taken.
_CONVERSION = 2


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}:{_CONVERSION}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


@contextmanager
def _file_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """De-quantize ``gguf_path`` into ``cache_dir/<key>`` once (process-safe) and return that dir."""
    target = cache_dir / _gguf_cache_key(gguf_path)
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process finished it while we waited
            return target
        log.info("converting %s to a safetensors cache at %s", gguf_path, target)
        staging = cache_dir / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            config = gguf_config(gguf_path)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, config=config)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except MemoryError:
            raise  # the machine's limit, not the file's fault
        except Exception as exc:  # an architecture transformers doesn't read, a damaged file: one sentence
            raise ModelLoadError(f"could not read GGUF file {gguf_path.name!r}: {_first_line(exc)}") from exc
        clear_gguf_quantization_flag(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target


def resolve_model_dir(model_ref: str, cache_dir: Path | None) -> str:
    """Map a job's ``model`` to something ``from_pretrained`` loads (a dir or a hub id)."""
    path = Path(model_ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {model_ref!r} does not exist")
        return str(convert_gguf(path, cache_dir or path.parent / ".sqft-cache"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {model_ref!r} has no config.json")
        return str(path)
    if model_ref.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model path {model_ref!r} does not exist")
    return model_ref  # a hub id


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def load_tokenizer(
    model_dir: str,
    tokenizer_name: str | None = None,
    *,
    trust_remote_code: bool = False,
    token: str | None = None,
) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_name or model_dir, trust_remote_code=trust_remote_code, token=_token(token)
        )
    except Exception as exc:  # transformers raises many types; the user needs one sentence
        raise ModelLoadError(f"could not load tokenizer {tokenizer_name or model_dir!r}: {_first_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked from attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(model_dir: str, **kwargs: Any) -> Any:
    """The auto class that loads ``model_dir``: ``AutoModelForCausalLM``, or ``AutoModelForImageTextToText``
    for an image-text model causal LMs don't cover (LLaVA; Gemma 3's image-text models are both)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        kind = AutoConfig.from_pretrained(model_dir, **kwargs).model_type
    except (OSError, ValueError):
        return AutoModelForCausalLM  # its own load says what is wrong
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_base_model(
    model_dir: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    token: str | None = None,
) -> PreTrainedModel:
    # safetensors only: a pickled checkpoint (pytorch_model.bin) could run code when it is read.
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, token=_token(token), use_safetensors=True)
    auto = model_class(model_dir, trust_remote_code=trust_remote_code, token=_token(token))
    try:
        # SDPA: PyTorch's fused attention (flash / memory-efficient kernels on a GPU). A model class
        # without it is loaded with its own default attention instead.
        model = auto.from_pretrained(model_dir, attn_implementation="sdpa", **kwargs)
    except ValueError:
        # transformers refuses an attention implementation a model class lacks with a ValueError; any
        # other problem of the model fails the default load too, and that error is the one reported.
        model = _load_default_attention(auto, model_dir, kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {model_dir!r}: {_first_line(exc)}") from exc
    clear_gguf_quantization_flag(model)
    attach_quantized_base(model, model_dir)
    return model


def _load_default_attention(auto: Any, model_dir: str, kwargs: dict) -> PreTrainedModel:
    try:
        return auto.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {model_dir!r}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
