"""Decoder families beyond Llama answer alike batched and alone: Qwen3 (q/k norms) and Gemma 3 (layers
sliding over 4 positions, shorter than the prompts), in the engine's batched greedy lines and in a
reinforcement group's shared prompt cache (left-padded rows, positions counted from the first real token)."""

from __future__ import annotations

import pytest
from bench.tiny_llama import make_tiny_causal_lm

from sqft_service.inference.engine import InferenceEngine
from sqft_service.inference.spec import ModelSpec, Sampling
from sqft_service.training.sampling import sample_answers

WORDS = ["red", "green", "blue", "sky", "tree", "water", "fire", "stone", "cloud"]
FAMILIES = {
    "qwen3": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, num_hidden_layers=6),
}


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request, tokenizer):
    # A larger initialisation than the default, so that answers depend on the prompt.
    return make_tiny_causal_lm(request.param, len(tokenizer), initializer_range=0.5, **FAMILIES[request.param])


def test_batched_greedy_lines_are_each_prompts_own(family_model, tokenizer, tmp_path):
    family_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
    spec = ModelSpec("tiny", str(tmp_path))
    prompts = [tokenizer(" ".join(WORDS[: 5 + i % 5] * (1 + i // 3)))["input_ids"] for i in range(8)]
    assert len({len(p) for p in prompts}) > 4 and min(len(p) for p in prompts) > 4  # padded rows, past the window
    samplings = [Sampling(6, temperature=0.0) for _ in prompts]
    alone = [engine.generate(spec, ids, s)[0] for ids, s in zip(prompts, samplings, strict=True)]
    assert len({c.text for c in alone}) > 4  # answers that depend on the prompt: a mix-up of rows would show
    assert engine.generate_together(spec, prompts, samplings) == alone


def test_a_group_shares_its_prompts_cache_and_decodes_as_each_prompt_alone(family_model, tokenizer):
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(" ".join(WORDS[: 2 + i * 3]))["input_ids"] for i in range(3)]
    alone = [
        sample_answers(family_model, [p], 1, max_tokens=6, temperature=None, pad_id=eos, eos_ids=[eos])[0]
        for p in prompts
    ]
    grouped = sample_answers(family_model, prompts, 3, max_tokens=6, temperature=1e-6, pad_id=eos, eos_ids=[eos])
    assert grouped == [a for a in alone for _ in range(3)]
