"""The integer weights of a QA-SparsePEFT merge, stored beside the merged model.

``sqft_int_weights.safetensors`` holds, per quantized linear ``name``: ``name.qweight`` (uint8 codes;
4-bit codes two to a byte, low nibble first along the input axis), ``name.scales`` (float32,
``out x in/group_size``) and ``name.zeros`` (uint8); its metadata gives ``bits`` and ``group_size``.
``(unpack(qweight) - zeros) * scales`` per group is bit-equal to the float32 weight of the merged
model, which stock transformers loads as usual (the float copy is what runs without an INT kernel).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .quantizer import GroupQuantizer, pack_codes, unpack_codes

INT_WEIGHTS_FILE = "sqft_int_weights.safetensors"


def save_int_weights(
    weights: dict[str, torch.Tensor], quantizers: dict[str, GroupQuantizer], directory: str | Path
) -> Path:
    """Write the codes of each ``weights[name]`` under ``quantizers[name]`` (:data:`INT_WEIGHTS_FILE`)."""
    tensors: dict[str, torch.Tensor] = {}
    bits = group_size = 0
    for name, weight in weights.items():
        q = quantizers[name]
        bits, group_size = q.bits, q.group_size
        tensors[f"{name}.qweight"] = pack_codes(q.codes(weight.detach().cpu()), q.bits).contiguous()
        tensors[f"{name}.scales"] = q.scale.detach().float().cpu().contiguous()
        tensors[f"{name}.zeros"] = q.zero.detach().to(torch.uint8).cpu().contiguous()
    path = Path(directory) / INT_WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"bits": str(bits), "group_size": str(group_size), "format": "sqft-int"})
    return path


def load_int_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> its float32 weight, dequantized from :data:`INT_WEIGHTS_FILE`."""
    path = Path(directory) / INT_WEIGHTS_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    bits, group_size = int(meta["bits"]), int(meta["group_size"])
    tensors = load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            q = GroupQuantizer(tensors[f"{name}.scales"], tensors[f"{name}.zeros"].float(), bits, group_size)
            out[name] = q.dequantize(unpack_codes(tensors[key], bits))
    return out
