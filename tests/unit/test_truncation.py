"""``truncation: "auto"``'s search: the fewest oldest turns dropped, cut only before a user or system
turn, the last one always kept, found by bisection."""

from __future__ import annotations

import pytest

from sqft_service.api.responses.truncation import fits, fitted


def _turns(pairs: int) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": "s"}]
    for n in range(pairs):
        turns += [{"role": "user", "content": f"u{n}"}, {"role": "assistant", "content": f"a{n}"}]
        if n % 3 == 1:  # an answer with a call and its result: kept or dropped with its question
            turns += [{"role": "tool", "content": f"t{n}"}]
    return [*turns, {"role": "user", "content": "last"}]


@pytest.mark.parametrize("budget", [1, 2, 5, 17, 40, 100])
def test_the_fewest_oldest_turns_that_fit_are_dropped_cutting_before_a_user_turn(budget):
    turns = _turns(30)
    probes: list[int] = []

    def measure(candidate):  # a turn costs one token
        probes.append(len(candidate))
        return len(candidate) <= budget

    kept = fitted(turns, measure)
    assert kept == turns[len(turns) - len(kept) :] and kept[-1]["content"] == "last"
    starts = [i for i, t in enumerate(turns) if t["role"] in ("user", "system")]
    if len(turns) <= budget:
        assert kept == turns and probes == [len(turns)]  # one measure when it all fits
    elif budget == 1:
        assert kept == turns[-1:]  # the last input alone: refused later if even that is too long
    else:
        assert len(kept) <= budget and kept[0]["role"] == "user"
        longer = [turns[i:] for i in starts if len(turns) - i > len(kept)]
        assert all(len(t) > budget for t in longer)  # nothing longer fits: the fewest dropped
    assert len(probes) <= 2 + len(starts).bit_length()


def test_a_prompt_fits_with_its_output_budget():
    assert fits(500, 512, 12) and not fits(500, 512, 13)
    assert fits(511, 512, None) and not fits(512, 512, None) and fits(10**6, 0, 10)
