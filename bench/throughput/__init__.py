"""Training throughput: this project's trainer side by side with plain HF Trainer + stock PEFT.

Run by ``make bench`` (``make bench ARGS=--quick`` for the short version; ``python -m bench.throughput
--help`` from the repository root for the options). Every setup trains the same model on the same
tokenized examples with the same seed, LoRA rank/targets and batch size, each in its own process (so
peak RSS is per setup):

* ``hf_peft_fp32`` / ``hf_peft_bf16``: ``transformers.Trainer`` + ``peft.get_peft_model``, the
  examples padded per batch by ``DataCollatorForSeq2Seq`` (what a user would write);
* ``reference_pad512``: the same, every example padded to ``max_length=512`` (the reference
  service's data handling);
* ``ours_lora`` / ``ours_nls`` / ``ours_sparsepeft``: :class:`sqft_service.training.recipe.FinetuneRecipe`
  as a job runs it (NLS search space 16,12,8; SparsePEFT on a 50% magnitude-pruned base), timed
  through its public ``step_hooks``.

Setups that are compared run as concurrent processes taking turns step by step (:mod:`.runner`),
so a drifting shared CPU slows them alike; each keeps its own model and peak RSS.

Reported per setup: real (non-pad) tokens/s over the measured steps after warm-up (total tokens
over total time; the median per-step rate too), the median step time, peak RSS, MFU against the
matmul peak measured on the spot (bf16 and fp32 GEMM), first and last training loss. A SparsePEFT
layer micro-benchmark compares our fused formulation with base-matmul + masked-delta matmul (and
plain LoRA). Results go to ``bench/results/<date>-<host>.json`` and ``bench/results/latest.json``;
a markdown table with ratios to ``hf_peft_fp32`` is printed.

Modules: ``__main__`` (options, the plan of setups, the parent's main loop), :mod:`.setups` (what
each setup runs in its child process), :mod:`.kernels` (GEMM peaks, the SparsePEFT layer),
:mod:`.runner` (child processes and their turn-taking), :mod:`.report` (rows, MFU, tables, the
results JSON), :mod:`.inputs` (constants, the model and data preparation).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
