"""OpenAI's ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` as transformers logits
processors, in one list with structured outputs' guide (torch imported when called).

OpenAI defines them on the logits before sampling: ``logit[t] - frequency * count(t) - presence *
[count(t) > 0] + bias[t]``, ``count`` over the tokens generated so far (not the prompt's; vLLM counts
the same). The engine generates without transformers' warpers (which would run before a caller's
processors, scaling a penalty by the temperature and letting top-p drop a token before its bias lifts
it): this module's list adjusts the logits first, then ``inference/draw.py`` draws at the request's
temperature and top-p. Log-probabilities (``inference/logprobs.py``) stay the model's own distribution.
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
    """The ``logits_processor`` list for ``s``: penalties and biases, then ``guide`` (structured outputs:
    the tokens it does not allow removed). The draw at ``s``'s temperature and top-p comes after them
    (``inference/draw.py``), so it samples among the allowed tokens only."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

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
    return LogitsProcessorList(processors)
