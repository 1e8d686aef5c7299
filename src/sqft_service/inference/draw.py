"""Drawing each row's next token in a batched ``generate()``, every row at its own temperature and top-p.

``generate(do_sample=True)`` takes one temperature and one top-p for the whole batch, so requests that
differ in them could not share a generation; and it draws with ``torch.multinomial``, which draws an
exponential for every vocabulary entry (49k per row per token on SmolLM2). :class:`TokenDraw` is
instead the last logits processor of a ``do_sample=False`` generation: it draws each sampled row's
token by the inverse CDF of softmax(scores / temperature) restricted to the row's top-p nucleus (one
uniform number a row, an order of magnitude cheaper; README, "Reinforcement fine-tuning"), and leaves that
token the only one with a finite score, so the greedy pick is the draw. Rows of temperature 0 keep
their scores (greedy). The distribution is the one transformers samples from (its temperature and
top-p warpers, then multinomial); the draws use torch's global generator, so a seeded generation
draws the same tokens again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TokenDraw:
    """A logits processor: per row ``temperatures[i]`` (0: greedy) and ``top_ps[i]`` (1: every token)."""

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float] | None = None) -> None:
        self.temperatures = torch.tensor([float(t) for t in temperatures], dtype=torch.float32)
        self.top_ps = None if top_ps is None or all(p >= 1.0 for p in top_ps) else torch.tensor(top_ps)
        self.any_sampled = any(t > 0 for t in temperatures)  # known on the host: no device sync per token

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if not self.any_sampled:
            return scores
        if self.temperatures.device != scores.device:  # moved once, not at every token
            self.temperatures = self.temperatures.to(scores.device)
            self.top_ps = None if self.top_ps is None else self.top_ps.to(scores.device)
        sampled = self.temperatures > 0
        # A greedy row's own division is by 1: its draw is computed and then not used.
        probs = torch.softmax(scores.float() / torch.where(sampled, self.temperatures, 1.0)[:, None], dim=-1)
        if self.top_ps is not None:
            probs = _nucleus(probs, self.top_ps)
        cdf = probs.cumsum(-1, dtype=torch.float64)  # fp64: a 49k-term running sum keeps tiny probabilities
        draw = torch.rand((scores.shape[0], 1), dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        # right=True: the first token whose cumulative probability exceeds the draw (never one of probability 0).
        token = torch.searchsorted(cdf, draw, right=True).clamp_(max=scores.shape[-1] - 1)
        chosen = torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
        return torch.where(sampled[:, None], chosen, scores)


def _nucleus(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """``probs`` with every token outside its row's top-p nucleus set to 0: a token stays while the tokens
    likelier than it hold less than ``top_p`` (transformers' ``TopPLogitsWarper``; the likeliest always)."""
    ordered, order = probs.sort(dim=-1, descending=True)
    above = ordered.cumsum(-1) - ordered  # the mass of the tokens likelier than each
    ordered = ordered.masked_fill(above >= top_ps[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(1, order, ordered)
