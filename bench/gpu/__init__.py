"""Training throughput on one GPU: this project's trainer against plain transformers.Trainer + stock peft.

``python -m bench.gpu`` (``make bench-gpu``) runs, for every planned row (a model shape, a data set and
a batch size), four setups one after another, each in a fresh process so that each has its own peak
GPU memory and an out-of-memory error ends only its own row:

* ``hf``: ``transformers.Trainer`` + ``peft.get_peft_model`` with ``bf16=True`` (fp32 master weights
  and bf16 autocast, what the Hugging Face docs tell users to do), dynamic padding;
* ``ours_lora``, ``ours_nls``, ``ours_sparsepeft``: :class:`~sqft_service.training.recipe.FinetuneRecipe`
  as a job runs it (``device`` and ``mixed_precision`` "auto"), plain LoRA, NLS elastic ranks, and
  SparsePEFT on a 50%-magnitude-pruned copy of the same weights.

Same LoRA everywhere (r=16, alpha 32, dropout 0.05 on q/k/v/up/down), same data (ARC-E, ~60 tokens
an example; GSM8K, ~200), same batch size. Models are random-initialised from the published shapes
of SmolLM2-135M, Llama-3.2-1B and Llama-3-8B, built on the device (no download; the architecture is
what costs); the token ids come from the SmolLM2 tokenizer, within every shape's vocabulary.

Each row reports real (non-pad) tokens/s over the measured steps (the GPU synchronised only at the
window's two ends), peak GPU memory, MFU (6·N FLOP per token, N = the linear layers' weights, over
the bf16 GEMM peak measured in the same run with an 8192³ matmul), and the first and last loss.
``--tiny`` runs tiny shapes for a few steps, on the CPU when there is no GPU: a check of the
script, not a measurement. Results go to ``bench/results/<date>-gpu-<device>.json`` (``--out``).
"""
