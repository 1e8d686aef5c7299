"""Write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio; transformers loads it too).

The tokenizer, chat template and architecture settings are copied from the GGUF file the base model
came from (the job's ``model``, or the source a sparse model was pruned from): a fine-tune of a GGUF
goes back to GGUF with nothing re-derived. Tensors keep the base file's names and order. Llama, Qwen2,
Qwen3, Gemma 2, Gemma 3, SmolLM3, Phi-3 and OLMo 2 architectures (a Mistral GGUF is a Llama one).

QA-SparsePEFT layers are written as the integers they trained with, never re-quantized: a group of
``group_size`` inputs with scale ``s`` and zero point ``z`` becomes ``group_size / 32`` GGML blocks,
``Q4_1`` (2 to 4 bits) or ``Q5_1`` (5 bits) with ``d = s`` and ``m = -s * z``, ``Q8_0`` (6 or 7 bits) with
``d = s`` and codes ``q - z``, or plain ``F32`` (8 bits). The quantizer keeps its scales float16-exact
(``adapters/qa/quantizer.py``), so GGML's ``d * q + m`` gives the merged model's weights bit for bit,
its zeros included; each layer is checked after encoding. Other weights go in the requested type
(4- and 5-bit types by the ``gguf`` package's GGML rounding, the embedding and head then in ``Q8_0``);
1-D tensors (norms) stay F32, as llama.cpp's own converter keeps them.

Written here because llama.cpp's ``convert_hf_to_gguf.py`` is not a package and re-quantizes from
floats, which would not give back the trained integers; the file format itself is the ``gguf``
package's writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from torch import nn

from .adapters.peft_utils import language_model_path
from .adapters.qa.quantizer import GroupQuantizer
from .model_sources import GGUF_TYPES, GGUFExportError

__all__ = ["GGUF_FILE", "GGUF_TYPES", "GGUFExportError", "copy_fields", "export_gguf", "int_blocks"]

GGUF_FILE = "model.gguf"
_WEIGHT_TYPES = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_TYPES}
_FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}
_BLOCKED = {t for t in _WEIGHT_TYPES.values() if t.name.startswith("Q")}
# The embedding and the head (the embedding again when tied) are what 4- and 5-bit types hurt most:
# llama.cpp's quantizer gives the head more bits too. They go Q8_0 when the rest is 4 or 5 bits.
_WIDE = ("token_embd.weight", "output.weight")


class _Arch(NamedTuple):
    """How llama.cpp stores an architecture's tensors, where it differs from transformers."""

    model_arch: gguf.MODEL_ARCH
    permuted: bool  # q/k rows interleaved for llama.cpp's rotary kernel (``_permute``): Llama's, not Qwen's
    norm_shift: float = 0.0  # added to every RMSNorm weight: Gemma's norms scale by 1 + weight, llama.cpp's by weight
    head_required: bool = False  # llama.cpp loads no model without an ``output`` tensor (OLMo 2): a tied one too


# Architectures whose tensor layout we write and test; another needs its own rules checked before it is listed.
_ARCHITECTURES = {
    "llama": _Arch(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": _Arch(gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": _Arch(gguf.MODEL_ARCH.QWEN3, False),
    "gemma2": _Arch(gguf.MODEL_ARCH.GEMMA2, False, norm_shift=1.0),
    "gemma3": _Arch(gguf.MODEL_ARCH.GEMMA3, False, norm_shift=1.0),
    "smollm3": _Arch(gguf.MODEL_ARCH.SMOLLM3, True),
    # Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are ([q; k; v],
    # [gate; up]: llama.cpp's fused SwiGLU gates by the first half, as transformers' chunk(2) does).
    "phi3": _Arch(gguf.MODEL_ARCH.PHI3, False),
    # OLMo 2: q/k norms over whole projections, norms after attention and MLP (none before), NeoX rope.
    "olmo2": _Arch(gguf.MODEL_ARCH.OLMO2, False, head_required=True),
}
_ROPE_TENSORS = ("rope_freqs.", "rope_factors_long.", "rope_factors_short.")
_BLOCK = 32  # the block length of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, keep: Callable[[str], bool]) -> None:
    """The metadata of ``reader`` whose names ``keep`` accepts, into ``writer`` (never the file's own
    ``GGUF.*`` fields nor the architecture, which the writer sets)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE or not keep(field.name):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a Llama q/k projection (and for anything indexed by its rows)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def int_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> tuple[np.ndarray, Any]:
    """GGML blocks (uint8, one row of blocks per output row) holding ``(codes - zero) * scale`` exactly.

    ``codes``: ``(out, in)`` integers; ``scale`` / ``zero``: ``(out, in / group_size)`` with
    ``group_size`` a multiple of 32. Returns the bytes and their GGML type.
    """
    out, inp = codes.shape
    per_group = inp // scale.shape[1] // _BLOCK
    d = np.repeat(scale.astype(np.float32), per_group, axis=1)  # one scale per 32-block
    z = np.repeat(zero.astype(np.float32), per_group, axis=1)
    q = codes.astype(np.uint8).reshape(out, inp // _BLOCK, _BLOCK)
    d16 = d.astype(np.float16)[..., None].view(np.uint8)
    if bits <= 5:
        m16 = (-d * z).astype(np.float16)[..., None].view(np.uint8)
        low = q & np.uint8(0x0F)
        qs = low[..., : _BLOCK // 2] | (low[..., _BLOCK // 2 :] << np.uint8(4))
        if bits <= 4:
            parts, qtype = [d16, m16, qs], gguf.GGMLQuantizationType.Q4_1
        else:
            qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")
            parts, qtype = [d16, m16, qh, qs], gguf.GGMLQuantizationType.Q5_1
    else:
        signed = (q.astype(np.int16) - z[..., None].astype(np.int16)).astype(np.int8).view(np.uint8)
        parts, qtype = [d16, signed], gguf.GGMLQuantizationType.Q8_0
    return np.concatenate(parts, axis=-1).reshape(out, -1), qtype


def _encode_int(weight: np.ndarray, quantizer: GroupQuantizer, row_order) -> tuple[np.ndarray, Any, bool]:
    """A QA layer's weight (float32, on its grid) as its integers; ``exact``: GGML decodes it bit for bit."""
    if quantizer.bits > 7 or quantizer.group_size % _BLOCK:
        # No GGML block holds these codes: exact floats (rows in llama.cpp's order all the same).
        return row_order(weight), gguf.GGMLQuantizationType.F32, True
    codes = row_order(quantizer.codes(torch.from_numpy(weight)).numpy())
    scale = row_order(quantizer.scale.cpu().numpy())
    zero = row_order(quantizer.zero.cpu().numpy())
    data, qtype = int_blocks(codes, scale, zero, quantizer.bits)
    exact = np.array_equal(gguf.quants.dequantize(data, qtype).reshape(weight.shape), row_order(weight))
    return data, qtype, exact


@dataclass
class _Layout:
    """What an export takes from its source: architecture, settings, tensor names and order."""

    arch: str
    n_head: int
    n_head_kv: int
    n_blocks: int
    add_fields: Callable[[gguf.GGUFWriter], None]
    order: list[str] | None  # tensor names in file order; None: the model's own (llama.cpp's converter's)
    shapes: dict[str, tuple[int, ...]]  # the shape each tensor must have, where the source says
    fixed: dict[str, tuple[np.ndarray, Any]]  # tensors that are settings, not weights: data and GGML type


def _gguf_layout(source: Path) -> _Layout:
    reader = gguf.GGUFReader(str(source))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    if arch not in _ARCHITECTURES:
        raise GGUFExportError(f"GGUF export writes {sorted(_ARCHITECTURES)} models; {source.name} is {arch!r}")
    rewritten = (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)

    def setting(key: str) -> int:
        return int(reader.get_field(key.format(arch=arch)).contents())

    return _Layout(
        arch=arch,
        n_head=setting(gguf.Keys.Attention.HEAD_COUNT),
        n_head_kv=setting(gguf.Keys.Attention.HEAD_COUNT_KV),
        n_blocks=setting(gguf.Keys.LLM.BLOCK_COUNT),
        add_fields=lambda writer: copy_fields(reader, writer, lambda name: name not in rewritten),
        order=[t.name for t in reader.tensors],
        shapes={t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors},
        # Llama 3's rope frequencies, LongRoPE's factors: settings, not weights; kept as they were.
        fixed={t.name: (t.data, t.tensor_type) for t in reader.tensors if t.name.startswith(_ROPE_TENSORS)},
    )


def _hf_layout(source: Path, config: Any) -> _Layout:
    from .gguf_hf import add_hf_fields, head_dim, hf_architecture, rope_tensors

    arch = hf_architecture(config)
    n_head = config.num_attention_heads
    rope = rope_tensors(config, head_dim(config))
    return _Layout(
        arch=arch,
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        n_blocks=config.num_hidden_layers,
        add_fields=lambda writer: add_hf_fields(writer, source, config, source.name),
        order=None,
        shapes={},
        fixed={name: (data, gguf.GGMLQuantizationType.F32) for name, data in rope.items()},
    )


def export_gguf(
    model: nn.Module,
    source: Path,
    path: Path,
    out_type: str = "f16",
    quantizers: dict[str, GroupQuantizer] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a merged model of ``source``'s architecture) to ``path``.

    Args:
        model: The merged model (any device and dtype; a QA-SparsePEFT merge in float32).
        source: The GGUF file its base came from (metadata, tokenizer, tensor names and order copied), or
            the base's model directory (``config.json`` + ``tokenizer.json``: metadata derived, ``gguf_hf``).
        path: The file to write.
        out_type: One of :data:`GGUF_TYPES`, for every 2-D weight that is not a QA layer.
        quantizers: A QA-SparsePEFT adapter's quantizers (module name -> quantizer).

    Returns:
        ``file`` (the name), ``bytes``, ``tensor_types`` (GGML type -> count) and ``exact_int_layers``
        (QA layers that GGML decodes to the merged weights bit for bit; ``int_layers`` of them).

    Raises:
        GGUFExportError: an architecture or tokenizer we don't write, or the model doesn't match the file.
    """
    if out_type not in _WEIGHT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r}: one of {', '.join(GGUF_TYPES)}")
    config = getattr(model, "config", None)
    # An image-text model (Gemma 3 4B and up) is written as its text decoder, as llama.cpp's converter
    # does (the image side goes in a separate mmproj file; fine-tuning on text leaves it as it was).
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout = _gguf_layout(source) if source.suffix == ".gguf" else _hf_layout(source, config)
    model_arch, permuted, norm_shift, head_required = _ARCHITECTURES[layout.arch]
    names = gguf.get_tensor_name_map(model_arch, layout.n_blocks)
    decoder = language_model_path(model)
    state = {}
    for key, tensor in model.state_dict().items():
        text_key = key  # a causal LM's own names; an image-text model's decoder renamed to them
        if decoder and decoder != "model" and not key.startswith("lm_head."):
            if not key.startswith(f"{decoder}."):
                continue
            text_key = f"model.{key.removeprefix(f'{decoder}.')}"
        name = names.get_name(text_key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            state[name] = (key.removesuffix(".weight"), tensor)
    order = layout.order
    if order is None:
        # A tied head is the embedding (llama.cpp falls back to token_embd when output is absent).
        tied = getattr(config, "tie_word_embeddings", False) and not head_required
        order = [*layout.fixed, *(name for name in state if not (tied and name == "output.weight"))]
    quantizers = quantizers or {}

    writer = gguf.GGUFWriter(str(path), layout.arch)
    layout.add_fields(writer)

    types: dict[str, int] = {}
    int_layers = exact = 0
    for name in order:
        if name not in state:
            if name not in layout.fixed:
                raise GGUFExportError(f"the base GGUF's {name} has no counterpart in the merged model")
            data, raw_type = layout.fixed[name]
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)
            types[raw_type.name] = types.get(raw_type.name, 0) + 1
            continue
        module, tensor = state[name]
        weight = tensor.detach().float().cpu().numpy()
        if norm_shift and name.endswith("norm.weight"):
            weight = weight + np.float32(norm_shift)
        if weight.shape != layout.shapes.get(name, weight.shape):
            raise GGUFExportError(
                f"{name}: the model's {weight.shape} differs from the base GGUF's {layout.shapes[name]}"
            )
        heads = layout.n_head if ".attn_q." in name else layout.n_head_kv if ".attn_k." in name else None
        heads = heads if permuted else None

        def row_order(rows, heads=heads):
            return _permute(rows, heads) if heads else rows

        if module in quantizers:
            data, qtype, ok = _encode_int(weight, quantizers[module], row_order)
            int_layers += 1
            exact += ok
        else:
            qtype = _WEIGHT_TYPES[out_type] if weight.ndim == 2 else gguf.GGMLQuantizationType.F32
            if qtype in _BLOCKED and qtype != gguf.GGMLQuantizationType.Q8_0 and name in _WIDE:
                qtype = gguf.GGMLQuantizationType.Q8_0
            if qtype in _BLOCKED and weight.shape[-1] % _BLOCK:
                qtype = gguf.GGMLQuantizationType.F16  # as llama.cpp: rows no block fits
            data = gguf.quants.quantize(row_order(weight), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    dominant = max(
        (t for t in types if gguf.GGMLQuantizationType[t] in _FILE_TYPES and t != "F32"), key=types.get, default="F32"
    )
    writer.add_file_type(_FILE_TYPES[gguf.GGMLQuantizationType[dominant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "tensor_types": types,
        "int_layers": int_layers,
        "exact_int_layers": exact,
    }
