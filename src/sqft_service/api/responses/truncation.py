"""``truncation: "auto"``: a response whose conversation does not fit the model's context (its prompt and
``max_output_tokens``) is answered without its oldest turns, as few dropped as fit (OpenAI drops items
from the beginning of the conversation). The turns it keeps begin at a user or system turn (a chat
template may require it), and the last such turn and what follows it are always kept: when even that
does not fit, the request is answered as given, and refused as too long.

The search is a generator (``fitting``) driven by whoever can measure a prompt: the route through the
engine's worker (``ResponseService``), a batch job on its own engine (``jobs/batch.py``). Fewer turns
never make a longer prompt, so it bisects: one measure when the whole conversation fits, about
log2(turns) more when it does not."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

Turns = list[dict[str, Any]]
# Yields turns to measure, is sent whether they fit, returns the turns to answer with.
Search = Generator[Turns, bool, Turns]


def fitting(turns: Turns) -> Search:
    starts = [i for i, turn in enumerate(turns) if i == 0 or turn["role"] in ("user", "system")]
    if (yield turns) or len(starts) < 2:
        return turns
    lo, hi = 1, len(starts) - 1  # the first start whose turns fit is in [lo, hi], if any
    if not (yield turns[starts[hi] :]):
        return turns[starts[hi] :]  # nothing fits: refused as too long
    while lo < hi:
        mid = (lo + hi) // 2
        if (yield turns[starts[mid] :]):
            hi = mid
        else:
            lo = mid + 1
    return turns[starts[lo] :]


def fits(n_prompt: int, context: int, max_output_tokens: int | None) -> bool:
    """Whether a prompt of ``n_prompt`` tokens leaves room for ``max_output_tokens`` (one token when
    not set) in a ``context`` (0: unknown, anything fits) as ``inference/answer.sampling_for`` checks it."""
    return not context or n_prompt + (max_output_tokens or 1) <= context


def fitted(turns: Turns, measure: Callable[[Turns], bool]) -> Turns:
    """``fitting`` driven by a synchronous ``measure`` (whether the turns fit)."""
    search = fitting(turns)
    candidate = next(search)
    while True:
        try:
            candidate = search.send(measure(candidate))
        except StopIteration as stop:
            return stop.value
