"""The evaluate job's batched greedy generation answers exactly as one prompt at a time does."""

from __future__ import annotations

import json

import pytest
import torch

from sqft_service.evaluation import _prompt, greedy_answers
from sqft_service.inference.engine import InferenceEngine
from tests.conftest import make_tiny_llama

WORDS = ["red", "green", "blue", "sky", "tree", "water", "fire", "stone", "cloud"]


def one_at_a_time(model, tokenizer, prompts: list[list[int]], max_new: int) -> list[str]:
    """The evaluate job's former loop: each prompt alone, no padding."""
    eos = sorted(InferenceEngine._eos_ids(model, tokenizer))
    answers = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        answers.append(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def setup(tokenizer):
    # A larger initialisation than the default, so that answers depend on the prompt.
    model = make_tiny_llama(len(tokenizer), initializer_range=0.5)
    records = [{"instruction": " ".join(WORDS[: 1 + i % 9] * (1 + i // 3)), "output": "x"} for i in range(11)]
    prompts = [_prompt(tokenizer, r, "alpaca")[0] for r in records]
    assert len({len(p) for p in prompts}) > 5  # batches mix lengths, so rows are padded
    # An end-of-sequence id that the first prompt's answer reaches at its third token: that row ends
    # early while the others in its batch go on (the padding after an end must not leak into answers).
    first = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=3, do_sample=False, pad_token_id=2)
    stop = int(first[0, -1])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    expected = one_at_a_time(model, tokenizer, prompts, 10)
    assert len(set(expected)) == len(expected)  # distinct answers: a mix-up of rows would show
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in expected]
    assert min(lengths) < max(lengths)  # some answers ended at the end id, others ran to max_new_tokens
    return model, prompts, expected


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_batched_greedy_equals_one_at_a_time(setup, tokenizer, batch_size):
    model, prompts, expected = setup
    assert greedy_answers(model, tokenizer, prompts, 10, batch_size) == expected


def test_a_batch_that_runs_out_of_memory_is_halved_with_the_same_answers(setup, tokenizer):
    # What CUDA's allocator raises when a batch of more than 2 rows does not fit (this CPU has room).
    model, prompts, expected = setup
    seen: list[int] = []

    def tight(_module, args, kwargs):
        rows = kwargs["input_ids"].shape[0] if kwargs.get("input_ids") is not None else args[0].shape[0]
        seen.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.register_forward_pre_hook(tight, with_kwargs=True)
    try:
        assert greedy_answers(model, tokenizer, prompts, 10, 8) == expected
    finally:
        hook.remove()
    assert seen[:2] == [8, 4] and max(seen[2:]) == 2  # 8, then 4 ran out; the rest went in pairs


def test_the_engines_batched_greedy_answers_are_each_prompts_own(tmp_path, tokenizer):
    """``InferenceEngine.generate_together`` (a batch job's greedy lines): rows of different lengths,
    ``max_tokens`` and stop strings, generated together, get the choices ``generate`` gives each alone."""
    from sqft_service.inference.spec import ModelSpec, Sampling

    model = make_tiny_llama(len(tokenizer), initializer_range=0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
    spec = ModelSpec("tiny", str(tmp_path))
    prompts = [tokenizer(" ".join(WORDS[: 1 + i % 9] * (1 + i // 3)))["input_ids"] for i in range(10)]
    alone = [engine.generate(spec, ids, Sampling(12, temperature=0.0))[0] for ids in prompts]
    # A stop string inside the third prompt's answer: that row is cut there, as it is alone.
    stop = alone[2].text[len(alone[2].text) // 2 :][:3]
    samplings = [Sampling(4 + i % 3 * 4, temperature=0.0, stop=(stop,) if i == 2 else ()) for i in range(10)]
    want = [engine.generate(spec, ids, s)[0] for ids, s in zip(prompts, samplings, strict=True)]
    assert want[2].finish_reason == "stop" and {c.completion_tokens for c in want} >= {4, 8}
    assert engine.generate_together(spec, prompts, samplings) == want


def test_guided_rows_generated_together_get_each_prompts_own_answer(tmp_path, tokenizer):
    """Structured outputs and required calls in a batch of greedy lines: each row held to its own
    grammar (or none) gives the choice ``generate`` gives it alone."""
    from sqft_service.api.inference.protocol import ChatCompletionRequest
    from sqft_service.inference.spec import ModelSpec, Sampling

    model = make_tiny_llama(len(tokenizer), initializer_range=0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
    spec = ModelSpec("tiny", str(tmp_path))
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    pick = {
        "type": "object",
        "properties": {"c": {"enum": ["red", "blue"]}},
        "required": ["c"],
        "additionalProperties": False,
    }
    schema = {"type": "json_schema", "json_schema": {"name": "pick", "schema": pick}}
    tool = {"type": "function", "function": {"name": "f", "parameters": pick}}
    grammars = [
        None,
        ChatCompletionRequest.model_validate({**ask, "response_format": schema}).grammar,
        ChatCompletionRequest.model_validate({**ask, "response_format": {"type": "json_object"}}).grammar,
        ChatCompletionRequest.model_validate(
            {**ask, "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False}
        ).grammar,
    ]
    prompts = [tokenizer(" ".join(WORDS[: 2 + i]))["input_ids"] for i in range(8)]
    samplings = [Sampling(40, temperature=0.0, grammar=grammars[i % 4]) for i in range(8)]
    alone = [engine.generate(spec, ids, s)[0] for ids, s in zip(prompts, samplings, strict=True)]
    assert json.loads(alone[1].text)["c"] in ("red", "blue") and alone[1].finish_reason == "stop"
    assert alone[3].text.startswith("<tool_call>") and alone[3].finish_reason == "stop"
    assert engine.generate_together(spec, prompts, samplings) == alone


def test_sampled_rows_generated_together_draw_at_their_own_temperature_and_top_p(tmp_path, tokenizer):
    """Unseeded sampled lines share a batch with greedy ones: a greedy row's choice is its own; a row at
    a temperature near 0, or whose top-p nucleus holds one token, is the greedy answer however hot; a
    hot row with the whole vocabulary draws something else."""
    from sqft_service.inference.spec import ModelSpec, Sampling

    model = make_tiny_llama(len(tokenizer), initializer_range=0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
    spec = ModelSpec("tiny", str(tmp_path))
    prompts = [tokenizer(" ".join(WORDS[: 2 + i]))["input_ids"] for i in range(6)]
    greedy = [engine.generate(spec, ids, Sampling(10, temperature=0.0))[0] for ids in prompts]
    ways = [
        Sampling(10, temperature=0.0),
        Sampling(10, temperature=1e-6),
        Sampling(10, temperature=2.0, top_p=1e-6),
        Sampling(10, temperature=2.0),
    ]
    rows = [(i, w) for i in range(len(prompts)) for w in range(len(ways))]
    got = engine.generate_together(spec, [prompts[i] for i, _ in rows], [ways[w] for _, w in rows])
    for (i, w), choice in zip(rows, got, strict=True):
        if w < 3:
            assert choice == greedy[i], (i, ways[w])
    hot = [choice for (i, w), choice in zip(rows, got, strict=True) if w == 3]
    assert sum(c.text != g.text for c, g in zip(hot, greedy, strict=True)) >= 4


def test_token_draw_samples_each_row_from_its_tempered_nucleus():
    """``TokenDraw`` on many rows at once: rows of temperature 0 pass through; the others are left with
    one token, drawn from softmax(scores / T) within the row's top-p nucleus (transformers' warpers)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from sqft_service.inference.draw import TokenDraw

    base = torch.tensor([0.0, 1.0, 2.0, 0.5, float("-inf")])
    rows = 30_000
    settings = [(1.0, 1.0), (0.5, 1.0), (2.0, 0.8), (0.0, 1.0)]  # (temperature, top_p) per block of rows
    scores = base.repeat(rows * len(settings), 1)
    torch.manual_seed(0)
    out = TokenDraw([t for t, _ in settings for _ in range(rows)], [p for _, p in settings for _ in range(rows)])(
        None, scores.clone()
    )
    for k, (temperature, top_p) in enumerate(settings):
        block = out[k * rows : (k + 1) * rows]
        if temperature == 0:
            assert torch.equal(block, scores[:rows])  # greedy: the scores as they were
            continue
        assert torch.isneginf(block).sum(-1).eq(4).all()
        share = torch.bincount(block.argmax(-1), minlength=5).double() / rows
        warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, base[None].clone()))
        expected = torch.softmax(warped[0].double(), -1)
        assert share[expected == 0].sum() == 0  # outside the nucleus (and a masked token): never drawn
        torch.testing.assert_close(share, expected, atol=0.01, rtol=0)
