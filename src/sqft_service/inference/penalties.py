"""OpenAI's ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` as transformers logits
processors, in one list with structured outputs' guide (torch imported when called).

OpenAI defines them on the logits before sampling: ``logit[t] - frequency * count(t) - presence *
[count(t) > 0] + bias[t]``, ``count`` over the tokens generated so far (not the prompt's; vLLM counts
the same). transformers appends a caller's processors after its own temperature and top-p warpers, which
would scale a penalty by the temperature and let top-p drop a token before its bias lifts it; so a
request that adjusts the logits gets no built-in warpers, and this module's list applies the adjustment
first, then transformers' own ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``, the math generate()
would do without it. Log-probabilities (``inference/logprobs.py``) stay the model's own distribution.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from .spec import Sampling


def vocabulary_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_biases(s: Sampling, vocabulary: int) -> None:
    if outside := [token for token, _ in s.logit_bias if token >= vocabulary]:
        raise InvalidRequestError(
            f"`logit_bias` names token {outside[0]}, outside this model's vocabulary ({vocabulary} tokens)",
            param="logit_bias",
        )


def adjusted_processors(s: Sampling, prompt_len: int, vocabulary: int, device: Any, guide: Any = None) -> Any:
    """The ``logits_processor`` list for ``s`` (its temperature and top-p included when it samples):
    penalties and biases, then ``guide`` (structured outputs: the tokens it does not allow removed),
    then temperature and top-p, which so sample among the allowed tokens only."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    bias = None
    if s.logit_bias:
        bias = torch.zeros(vocabulary, device=device)
        ids = torch.tensor([t for t, _ in s.logit_bias], device=device)
        bias[ids] = torch.tensor([b for _, b in s.logit_bias], device=device)

    class Adjust(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if s.presence_penalty or s.frequency_penalty:
                generated = input_ids[:, prompt_len:]
                ones = torch.ones_like(generated, dtype=scores.dtype)
                counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
                scores = scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(scores.dtype)
            return scores if bias is None else scores + bias[: scores.shape[-1]]

    processors: list[Any] = [Adjust()] if s.presence_penalty or s.frequency_penalty or bias is not None else []
    if guide is not None:
        processors.append(guide)
    if not s.greedy:
        if s.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(s.temperature))
        if s.top_p < 1.0:
            processors.append(TopPLogitsWarper(s.top_p))
    return LogitsProcessorList(processors)
