"""Round-robin turns between benchmark processes, so compared setups see the same machine.

On a shared (virtual) CPU the speed of the same GEMM drifts by up to ~45% from one minute to the
next, so setups timed one after another compare machine states as much as trainers. A group of
setups therefore runs as concurrent processes that take turns: each timed step runs alone, and the
setups' steps interleave A, B, C, A, B, C, ... Every process keeps its own model and peak RSS.

The protocol is a few files in a shared directory: ``ready-<i>`` (set-up done; nobody starts before
all are ready), ``turn`` (the global turn counter; process ``i`` of ``n`` owns turns ``i, i+n, ...``)
and ``abort`` (a process failed: the others stop waiting and finish untimed by turns). Every process
of a group must take the same number of turns.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POLL_S = 0.01  # the hand-over latency; a step takes seconds


class Turns:
    def __init__(self, directory: str | None, index: int = 0, size: int = 1) -> None:
        self.dir = Path(directory) if directory else None
        self.index, self.size = index, size
        self.next_turn = index

    @classmethod
    def from_spec(cls, spec: dict) -> Turns:
        return cls(spec.get("turns_dir"), spec.get("turns_index", 0), spec.get("turns_size", 1))

    @property
    def active(self) -> bool:
        return self.dir is not None and self.size > 1 and not (self.dir / "abort").exists()

    def _wait(self, done) -> None:
        while self.active and not done():
            time.sleep(POLL_S)

    def ready(self) -> None:
        """Set-up is done here; wait until every process of the group is set up."""
        if self.dir is None:
            return
        (self.dir / f"ready-{self.index}").touch()
        self._wait(lambda: len(list(self.dir.glob("ready-*"))) >= self.size)

    def acquire(self) -> None:
        """Block until it is this process's turn."""
        self._wait(lambda: self._turn() == self.next_turn)

    def release(self) -> None:
        """Hand the turn to the next process."""
        if self.dir is None:
            return
        self.next_turn += self.size
        tmp = self.dir / f"turn.{self.index}"
        tmp.write_text(str(self._turn() + 1))
        os.replace(tmp, self.dir / "turn")  # atomic: a reader never sees a half-written number

    def abort(self) -> None:
        if self.dir is not None:
            (self.dir / "abort").touch()

    def _turn(self) -> int:
        try:
            return int((self.dir / "turn").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0
