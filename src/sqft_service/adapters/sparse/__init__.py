"""SparsePEFT: LoRA adapters whose updates keep a pruned base model's zeros."""

from .peft import MASK_BUFFER, SparseAdapter, SparseLoraLinear, enable_sparse_peft
from .report import sparsity_report

__all__ = ["MASK_BUFFER", "SparseAdapter", "SparseLoraLinear", "enable_sparse_peft", "sparsity_report"]
