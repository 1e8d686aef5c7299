"""One chat or completion request answered on an engine, start to end: render the prompt, fit the
sampling to the model's context, generate. Shared by the HTTP routes (on the engine's worker thread)
and batch jobs (in their own process), so a batch line is answered exactly as the route would answer it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import InvalidRequestError
from .engine import InferenceEngine
from .render import chat_ids, completion_ids, has_images
from .spec import Choice, ModelSpec, Sampling

# OpenAI's defaults when max_tokens is not given: completions 16; chat "up to the context", capped here.
DEFAULT_MAX_TOKENS = {"chat": 512, "completion": 16}


class SamplingRequest(Protocol):
    """What a chat or completion request says about sampling (``api/inference/protocol.py``)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int | None

    @property
    def stops(self) -> tuple[str, ...]: ...

    @property
    def scored(self) -> int | None: ...

    presence_penalty: float
    frequency_penalty: float

    @property
    def biases(self) -> tuple[tuple[int, float], ...]: ...


def sampling_for(req: SamplingRequest, n_prompt: int, context: int, kind: str, prompt_param: str) -> Sampling:
    """The request's sampling, its token budget checked against the model's context (400s naming the field)."""
    asked, param = req.max_tokens, "max_tokens"
    if (chat_max := getattr(req, "max_completion_tokens", None)) is not None:
        asked, param = chat_max, "max_completion_tokens"
    room = context - n_prompt if context else DEFAULT_MAX_TOKENS["chat"]
    if room < (0 if asked == 0 else 1):  # a prompt scored (`max_tokens` 0) may fill the context
        raise InvalidRequestError(
            f"the prompt is {n_prompt} tokens; this model's context holds {context}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if asked is not None and asked > room:
        raise InvalidRequestError(
            f"`{param}` {asked} does not fit: the prompt is {n_prompt} tokens of this model's {context}",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = asked if asked is not None else min(room, DEFAULT_MAX_TOKENS[kind])
    return Sampling(
        max_tokens,
        req.temperature,
        req.top_p,
        req.n,
        req.seed,
        req.stops,
        req.scored,
        bool(getattr(req, "echo", False)),
        req.presence_penalty,
        req.frequency_penalty,
        req.biases,
        getattr(req, "grammar", None),
    )


def answer(
    engine: InferenceEngine,
    spec: ModelSpec,
    render: Callable[[Any], list[int]],
    req: SamplingRequest,
    kind: str,
    param: str,
) -> tuple[int, list[Choice]]:
    """The prompt's token count and the generated choices (on the thread that owns ``engine``'s models)."""
    ids, context = engine.prepare(spec, render)
    return len(ids), engine.generate(spec, ids, sampling_for(req, len(ids), context, kind, param))


def chat_renderer(
    spec: ModelSpec, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> Callable[..., list[int]]:
    """Renders with the tokenizer; a prompt with images also takes the model's processor (``images`` set:
    ``InferenceEngine.prepare`` hands it over, None for a model that reads text only)."""

    def render(tokenizer: Any, processor: Any = None) -> list[int]:
        return chat_ids(tokenizer, messages, spec.data_format, tools, processor)

    render.images = has_images(messages)  # type: ignore[attr-defined]
    return render


def completion_renderer(prompt: str | list[int]) -> Callable[[Any], list[int]]:
    if isinstance(prompt, str):
        return lambda tokenizer: completion_ids(tokenizer, prompt)

    def ids(tokenizer: Any) -> list[int]:
        check_token_ids(tokenizer, prompt, "prompt")
        return list(prompt)  # token ids are the prompt as they are: no BOS added

    return ids


def check_token_ids(tokenizer: Any, ids: list[int], param: str) -> None:
    """A 400 naming ``param`` unless every id of ``ids`` (non-negative: the schema's) is in the vocabulary."""
    if (largest := max(ids)) >= len(tokenizer):
        raise InvalidRequestError(
            f"token id {largest} is not in this model's vocabulary ({len(tokenizer)} tokens)", param=param
        )
