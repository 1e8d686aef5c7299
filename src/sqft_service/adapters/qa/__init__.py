"""QA-SparsePEFT: a sparse adapter trained through the base's integer quantizer (one INT model out)."""

from .export import INT_WEIGHTS_FILE, load_int_weights, save_int_weights
from .gptq import QUANTIZED_BASE_FILE, attach_quantized_base, quantized_base_of
from .peft import (
    QUANT_FILE,
    QuantAwareAdapter,
    QuantAwareSparseLoraLinear,
    QuantSettingError,
    enable_quantization_aware,
    saved_quantizers,
)
from .quantizer import GroupQuantizer

__all__ = [
    "INT_WEIGHTS_FILE",
    "QUANTIZED_BASE_FILE",
    "QUANT_FILE",
    "GroupQuantizer",
    "QuantAwareAdapter",
    "QuantAwareSparseLoraLinear",
    "QuantSettingError",
    "attach_quantized_base",
    "enable_quantization_aware",
    "load_int_weights",
    "quantized_base_of",
    "save_int_weights",
    "saved_quantizers",
]
