"""The tiny random Llama the tests and the load benchmark serve: 2 layers of 16 dimensions (other families too).

Small enough to train and answer in well under a second on a CPU, with the shapes of the real thing
(grouped-query attention, an untied head). The tests (``tests/conftest.py``) and ``bench/load`` build it
here, so both exercise the same model.
"""

from __future__ import annotations

from typing import Any


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides: Any):
    """A random-initialised ``LlamaForCausalLM`` in eval mode; ``overrides`` are ``LlamaConfig`` arguments."""
    return make_tiny_causal_lm("llama", vocab_size, seed, **overrides)


def make_tiny_causal_lm(model_type: str, vocab_size: int, seed: int = 0, **overrides: Any):
    """The tiny shape in another decoder family (``"mistral"``, ``"qwen2"``, ...), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()
