"""How a job process is started and stopped: the embedded subprocess runner, or a Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..settings import Settings


class LaunchError(Exception):
    """The job could not be started (no node can take it, the node lacks the data dir, ...)."""


@dataclass
class LaunchSpec:
    job_id: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    # Paths the job reads or writes outside its workspace (database, uploads, models): a Ray node
    # must see them all (the data dir is shared) before the job starts there.
    data_paths: list[Path] = field(default_factory=list)
    # Training.num_training_workers / worker_resources(Training) of a fine-tune (1 / None for other kinds).
    num_workers: int = 1
    resources_per_worker: dict[str, Any] | None = None
    # GPUs the job may use on this machine (jobs/gpus.py): the subprocess runner gives it that many.
    gpus: int = 0


class RunHandle(Protocol):
    job_id: str

    @property
    def pid(self) -> int | None: ...


class Runner(Protocol):
    # True when jobs keep running after the service stops (Ray): shutdown leaves them, and the next
    # start re-attaches (attach). False (subprocess): shutdown stops them, the next start resumes them.
    jobs_outlive_service: bool
    # True when the job process may write the service's SQLite store (same machine); False: it writes a
    # journal in its workspace that the manager ingests (jobs/journal.py).
    job_writes_store: bool

    def submit(self, spec: LaunchSpec) -> RunHandle:
        """Start the job; return once it runs. Raises LaunchError (or OSError) when it cannot start."""

    def poll(self, handle: RunHandle) -> int | None:
        """The exit code once the job has ended, else None."""

    def terminate(self, handle: RunHandle) -> None:
        """Ask the whole job to stop (SIGTERM to its process group)."""

    def kill(self, handle: RunHandle) -> None:
        """Stop it now (SIGKILL to its process group)."""

    def attach(self, job_id: str, pid: int | None) -> RunHandle | None:
        """After a restart: a handle on the job if it still runs and can be watched, else None (then any
        process left of it is stopped, and the manager settles the job from its outcome)."""

    def check_gpu(self) -> str | None:
        """None when a job that asks for a CUDA GPU (``Training.device`` "cuda") can get one where this
        runner runs jobs, else why not, naming where it looked (the API's 400 quotes it)."""

    def check_gpu_workers(self, device: str, workers: int) -> str | None:
        """None when ``workers`` data-parallel workers with ``Training.device`` ``device`` ("cuda" or
        "auto") that train on GPUs can get one GPU each, else why not (the API's 400 quotes it)."""


def worker_resources(training: dict[str, Any]) -> dict[str, float]:
    """What each training worker of a fine-tune asks Ray for (its actor, or its Ray Train worker).

    ``Training.resources_per_worker`` (default one CPU), plus one GPU when ``Training.device`` is "cuda"
    and it names none: Ray then places the worker on a node with a GPU and makes that GPU visible to it.
    Without it Ray gives the worker ``CUDA_VISIBLE_DEVICES=""``, and "cuda" would fail even on a GPU node.

    Args:
        training: The ``Training`` section of a fine-tune's resolved config.
    """
    resources = dict(training.get("resources_per_worker") or {"CPU": 1})
    if training.get("device") == "cuda" and "GPU" not in resources:
        resources["GPU"] = 1
    return resources


def build_runner(settings: Settings) -> Runner:
    """The runner ``settings.runner`` names (``subprocess`` or ``ray``).

    Raises:
        ImportError: ``ray`` asked for but not installed (the message says what to install).
        ConnectionError: no Ray cluster answers at ``settings.ray_address``.
    """
    if settings.runner == "ray":
        from .ray_runner import RayRunner

        return RayRunner(settings.ray_address, settings.ray_namespace)
    from .subprocess_runner import SubprocessRunner

    return SubprocessRunner(gpu_ids=settings.job_gpu_ids)
