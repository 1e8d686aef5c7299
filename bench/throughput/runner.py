"""Each setup in a fresh interpreter; setups that are compared take turns step by step.

On a shared (virtual) CPU the speed of the same GEMM drifts by up to ~45% from one minute to the
next, so setups timed one after another compare machine states as much as trainers. A group of
setups therefore runs as concurrent processes that take turns (:class:`Turns`): each timed step runs
alone, and the setups' steps interleave A, B, C, A, B, C, ... Every process keeps its own model and
peak RSS.

The parent writes each child's spec (a JSON dict) to a file and runs ``python -m <this package>
--child <file>``; the child prints its result row as the last JSON line of its stdout.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.01  # the hand-over latency; a step takes seconds
PACKAGE = __package__ or "throughput"
# The directory `python -m PACKAGE` must run in: the repository root for `bench.throughput`.
IMPORT_ROOT = Path(__file__).resolve().parents[PACKAGE.count(".") + 1]


class Turns:
    """Round-robin turns between the processes of one group.

    The protocol is a few files in a shared directory: ``ready-<i>`` (set-up done; nobody starts
    before all are ready), ``turn`` (the global turn counter; process ``i`` of ``n`` owns turns
    ``i, i+n, ...``) and ``abort`` (a process failed: the others stop waiting and finish untimed by
    turns). Every process of a group must take the same number of turns. With no directory (a setup
    that runs alone) every method returns at once.
    """

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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------- parent
def run_group(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run setups, each in a fresh interpreter; several at once take turns step by step.

    A child's last stdout line is its JSON row; a failed child gives a row with ``error``.
    """
    turns_dir = tempfile.mkdtemp(prefix="sqft-turns-") if len(specs) > 1 else None
    started = time.perf_counter()
    children = []
    for index, spec in enumerate(specs):
        spec = {**spec, "turns_dir": turns_dir, "turns_index": index, "turns_size": len(specs)}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(spec, handle)
        cmd = [sys.executable, "-m", PACKAGE, "--child", handle.name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=IMPORT_ROOT)
        children.append((spec, handle.name, proc))
    rows = []
    for spec, spec_path, proc in children:
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            rows.append({"name": spec["name"], "error": f"timed out after {timeout:.0f} s"})
            continue
        finally:
            os.unlink(spec_path)
        lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (err or out).strip().splitlines()[-15:]
            rows.append({"name": spec["name"], "error": f"exit {proc.returncode}: " + " | ".join(tail)})
            continue
        row = json.loads(lines[-1])
        row["wall_s"] = round(time.perf_counter() - started, 1)
        if len(specs) > 1:
            row["interleaved_with"] = [s["name"] for s in specs if s["name"] != spec["name"]]
        rows.append(row)
    if turns_dir:
        shutil.rmtree(turns_dir, ignore_errors=True)
    return rows


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_group([spec], timeout)[0]


# -------------------------------------------------------------------------------------------- child
def child_main(spec_path: str, run_setup: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The child side: run one spec, print its row (with this process's peak RSS) as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
    try:
        row = run_setup(spec)
    except BaseException:
        Turns.from_spec(spec).abort()  # let the rest of the group go on without waiting for this one
        raise
    finally:
        shutil.rmtree(spec["tmp"], ignore_errors=True)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(row), flush=True)
