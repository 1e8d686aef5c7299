"""Which batch lines share a batched generation (``jobs/batch._together``): only those whose answer
``generate_together`` gives as the route would (greedy and guided ones exactly, unseeded sampled ones
from the same distribution: tests/unit/test_evaluation_generation.py); any line asking for more is
answered alone, as the route does."""

from __future__ import annotations

from sqft_service.api.inference.protocol import ChatCompletionRequest, CompletionRequest
from sqft_service.jobs.batch import _together


def test_only_plain_greedy_or_unseeded_lines_are_generated_together():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    assert _together(ChatCompletionRequest.model_validate(chat))
    assert _together(ChatCompletionRequest.model_validate({**chat, "presence_penalty": 0, "logit_bias": {"7": 0}}))
    # Sampled lines too, drawn at their own temperature and top-p, unless a seed asks for repeatable draws.
    assert _together(ChatCompletionRequest.model_validate({**chat, "temperature": 1, "top_p": 0.5}))
    assert _together(ChatCompletionRequest.model_validate({**chat, "seed": 7}))  # greedy: a seed changes nothing
    for extra in (
        {"temperature": 1, "seed": 7},
        {"n": 2},
        {"logprobs": True},
        {"presence_penalty": 0.5},
        {"frequency_penalty": -1},
        {"logit_bias": {"7": 3}},
    ):
        assert not _together(ChatCompletionRequest.model_validate({**chat, **extra})), extra
    assert _together(ChatCompletionRequest.model_validate({**chat, "response_format": {"type": "text"}}))
    # A structured output or a required call: each row held to its own grammar in the batch.
    assert _together(ChatCompletionRequest.model_validate({**chat, "response_format": {"type": "json_object"}}))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert _together(ChatCompletionRequest.model_validate({**chat, "tools": [tool], "tool_choice": "required"}))
    completion = {"model": "m", "prompt": "x", "temperature": 0}
    assert _together(CompletionRequest.model_validate(completion))
    for extra in ({"echo": True}, {"logprobs": 0}, {"max_tokens": 0}):
        assert not _together(CompletionRequest.model_validate({**completion, **extra})), extra
