"""How a job process is started and stopped: the embedded subprocess runner, or Ray (later)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class LaunchSpec:
    job_id: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path


class RunHandle(Protocol):
    job_id: str

    @property
    def pid(self) -> int | None: ...


class Runner(Protocol):
    def submit(self, spec: LaunchSpec) -> RunHandle:
        """Start the job; return at once."""

    def poll(self, handle: RunHandle) -> int | None:
        """The exit code once the job has ended, else None."""

    def terminate(self, handle: RunHandle) -> None:
        """Ask the whole job to stop (SIGTERM to its process group)."""

    def kill(self, handle: RunHandle) -> None:
        """Stop it now (SIGKILL to its process group)."""
