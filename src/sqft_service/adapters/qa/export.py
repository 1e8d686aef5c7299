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

from .quantizer import GroupQuantizer, load_quantizers, pack_codes, save_quantizers, unpack_codes

INT_WEIGHTS_FILE = "sqft_int_weights.safetensors"


def save_int_weights(
    weights: dict[str, torch.Tensor], quantizers: dict[str, GroupQuantizer], directory: str | Path
) -> Path:
    """Write the codes of each ``weights[name]`` under ``quantizers[name]`` (:data:`INT_WEIGHTS_FILE`)."""
    codes = {
        f"{name}.qweight": pack_codes(quantizers[name].codes(w.detach().cpu()), quantizers[name].bits).contiguous()
        for name, w in weights.items()
    }
    used = {name: quantizers[name] for name in weights}
    return save_quantizers(Path(directory) / INT_WEIGHTS_FILE, used, extra=codes, format="sqft-int")


def load_int_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> its float32 weight, dequantized from :data:`INT_WEIGHTS_FILE`."""
    quantizers, tensors = load_quantizers(Path(directory) / INT_WEIGHTS_FILE)
    return {name: q.dequantize(unpack_codes(tensors[f"{name}.qweight"], q.bits)) for name, q in quantizers.items()}
