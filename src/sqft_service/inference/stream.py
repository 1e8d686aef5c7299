"""Generated token ids → text, with stop strings: for streamed and whole answers alike.

Both paths decode the whole sequence so far with the same arguments, so the streamed pieces
concatenate to exactly the text a non-streamed request returns. A piece is held back while the text
ends in an incomplete UTF-8 character (U+FFFD) or in what could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .spec import TokenLogprob


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Decoder:
    """Feeds on token ids; knows the text so far, how it ended, and how many tokens it counts."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stops = stops
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # the kept tokens' scores, when they are scored
        self._reported = 0  # how many of them ``new_logprobs`` has handed out
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_ids: Iterable[int], scores: Sequence[TokenLogprob] | None = None) -> str:
        """Take new tokens (and their scores, if kept); return the text that can be sent now."""
        for i, token in enumerate(token_ids):
            if self.done:
                break
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            self.ids.append(token)
            if scores is not None:
                self.logprobs.append(scores[i])
            if self.stops:  # checked per token, so `ids` ends with the token that completed the stop
                self._decode()
                if (cut := _stop_at(self.text, self.stops)) is not None:
                    self.text, self.finish_reason = self.text[:cut], "stop"
        if not self.stops:
            self._decode()
        if self.done:
            return self.flush()
        ready = len(self.text) - _partial_stop(self.text, self.stops)
        while ready > self.sent and self.text[ready - 1] == "\ufffd":
            ready -= 1
        piece, self.sent = self.text[self.sent : max(ready, self.sent)], max(ready, self.sent)
        return piece

    def new_logprobs(self) -> list[TokenLogprob]:
        """The kept tokens' scores not handed out yet (a streamed piece carries those read since the last)."""
        new, self._reported = self.logprobs[self._reported :], len(self.logprobs)
        return new

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece

    def close(self) -> str:
        """The generation ended: what remains to send (hit max_tokens unless it stopped)."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self.flush()

    def _decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
