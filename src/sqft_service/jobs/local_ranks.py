"""The subprocess runner's data-parallel launcher: one fine-tune as N ranks of one process group on this machine.

The job process the manager started is rank 0. It opens the group's rendezvous store on a free
loopback port and starts ranks ``1..N-1`` as its own children (``python -m sqft_service.jobs.worker
... --rank r --store-port p``). We do not use ``torchrun``: torch.distributed.elastic starts its
workers with ``start_new_session=True``, so the manager's ``killpg`` (a cancel's SIGKILL, the kill of an
orphan after a restart) would reach the agent and leave the ranks running. Here every rank stays in
the job's session, and each child also asks the kernel for SIGKILL when rank 0 dies
(``PR_SET_PDEATHSIG``), which covers rank 0 being killed on its own.

Where the ranks train: on the CPU cores (a gloo group, each rank a share of the threads), or, when
``Training.device`` is "cuda", or "auto" on a machine with GPUs, rank ``r`` on GPU ``r`` (an NCCL
group for the gradients, plus the gloo side group ``training/distributed.py`` uses for host values).
A GPU rank takes a GPU of its own (:func:`~sqft_service.devices.gpus_short`): fewer GPUs than ranks
fail the job naming ``Training.num_training_workers`` (the API refuses it first).

How a multi-rank job ends: rank 0 writes ``outcome.json`` as a single process would; SIGTERM reaches
every rank, and rank 0's stop flag is handed to all at the next step (``training/distributed.py``). A
rank that dies breaks the others' next collective (:class:`~sqft_service.training.distributed.RankLost`):
rank 0 then writes no outcome, so the manager treats the job as cut short and resumes it.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..devices import NO_LOCAL_GPU, cuda_refused, gpus_short, too_few_gpus
from ..errors import InvalidConfigurationError
from ..threads import ENV_VAR as THREADS_ENV
from ..threads import physical_cores

log = logging.getLogger("sqft_service.worker")

RANK0_PID_ENV = "SQFT_RANK0_PID"
TIMEOUT_ENV = "SQFT_DIST_TIMEOUT_S"  # how long a collective waits for a rank that is alive but stuck
DEFAULT_TIMEOUT_S = 1800.0
# How long the ranks wait for each other to join: a process start and a torch import, before any model loads.
JOIN_TIMEOUT = datetime.timedelta(seconds=300)
_PR_SET_PDEATHSIG = 1
_JOINED = "sqft/joined/"  # store key a child rank sets once it reaches rank 0's store


def world_size_of(spec: dict[str, Any]) -> int:
    """How many ranks a job runs as: ``Training.num_training_workers`` for a fine-tune, else 1."""
    if spec.get("kind") != "fine_tune":
        return 1
    return int(spec["params"].get("Training", {}).get("num_training_workers", 1))


def check_local_resources(training: dict[str, Any]) -> None:
    """The subprocess runner honours ``resources_per_worker`` "CPU" only (each rank's threads).

    Raises:
        InvalidConfigurationError: a "GPU" or custom resource, which only Ray can place.
    """
    resources = training.get("resources_per_worker") or {}
    others = sorted(name for name in resources if name != "CPU")
    if others:
        raise InvalidConfigurationError(
            f"`Training.resources_per_worker` {others}: the subprocess runner places only 'CPU' (each worker's "
            "threads); `Training.device` picks every worker's device. Use the Ray runner (SQFT_RUNNER=ray) "
            "to give each worker GPUs or custom resources",
            param="Training.resources_per_worker",
        )


def ranks_on_gpus(training: dict[str, Any], world_size: int, gpus: int) -> bool:
    """Whether the ranks of a job train on GPUs, one each, on a machine with ``gpus`` CUDA GPUs.

    Raises:
        InvalidConfigurationError: ``Training.device`` "cuda" without a GPU, or fewer GPUs than ranks.
    """
    device = training.get("device", "auto")
    if device == "cpu":
        return False
    if device == "cuda" and gpus == 0:
        raise cuda_refused(NO_LOCAL_GPU)
    short = gpus_short(gpus, world_size, "this machine")
    if short is not None:
        raise too_few_gpus(world_size, device, short)
    return gpus > 0


def local_gpu_count() -> int:
    """The CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank_threads(training: dict[str, Any], world_size: int) -> int:
    """Intra-op threads of each rank: ``resources_per_worker.CPU``, else the job's share split N ways."""
    cpus = (training.get("resources_per_worker") or {}).get("CPU")
    if cpus:
        return max(1, int(cpus))
    budget = os.environ.get(THREADS_ENV)
    return max(1, (int(budget) if budget else physical_cores()) // world_size)


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def rank_environment(threads: int) -> dict[str, str]:
    """The thread budget of one rank, plus gloo on the loopback interface (the ranks share this machine)."""
    env = {THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads)}
    env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    return env


def open_store(world_size: int) -> Any:
    """Rank 0's rendezvous store, on a free loopback port chosen by the kernel (no race for a port)."""
    import torch.distributed as dist

    # wait_for_workers=False: the other ranks are started once the port is known.
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)


def start_ranks(
    worker_argv: list[str], world_size: int, store_port: int, threads: int, on_gpus: bool = False
) -> list[subprocess.Popen]:
    """Start ranks ``1..world_size-1`` as children of this process, in its session (``on_gpus``: one GPU each)."""
    env = dict(os.environ, **rank_environment(threads), **{RANK0_PID_ENV: str(os.getpid())})
    children = []
    for rank in range(1, world_size):
        argv = [*worker_argv, "--rank", str(rank), "--world-size", str(world_size), "--store-port", str(store_port)]
        if on_gpus:
            argv.append("--on-gpus")
        children.append(subprocess.Popen([sys.executable, "-m", "sqft_service.jobs.worker", *argv], env=env))
    return children


def wait_for_ranks(store: Any, children: list[subprocess.Popen]) -> None:
    """Rank 0: wait until every child rank has reached the store, failing at once if one exits first.

    Raises:
        RankLost: a child rank ended before it joined, or none joined within ``JOIN_TIMEOUT``.
    """
    from ..training.distributed import RankLost

    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    waiting = {rank: child for rank, child in enumerate(children, start=1)}
    while waiting:
        for rank, child in list(waiting.items()):
            if store.check([f"{_JOINED}{rank}"]):
                del waiting[rank]
            elif child.poll() is not None:
                raise RankLost(f"data-parallel rank {rank} exited with code {child.returncode} before it joined")
        if waiting and time.monotonic() > deadline:
            raise RankLost(f"data-parallel ranks {sorted(waiting)} did not join within {JOIN_TIMEOUT}")
        time.sleep(0.05)


def join_group(
    rank: int, world_size: int, store: Any = None, store_port: int | None = None, on_gpus: bool = False
) -> None:
    """Join the job's process group (rank 0 passes its store, the others its port).

    On CPUs a gloo group. On GPUs rank ``r`` first makes GPU ``r`` its current device (where
    ``Training.device`` then resolves, ``training/device.py``) and joins an NCCL group.
    """
    import torch
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore("127.0.0.1", int(store_port or 0), world_size, is_master=False, timeout=JOIN_TIMEOUT)
        store.set(f"{_JOINED}{rank}", "1")
    backend = "gloo"
    if on_gpus:
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=collective_timeout())


def die_with_rank0() -> None:
    """In a child rank: SIGKILL when rank 0 exits, and exit now if it already has."""
    rank0 = int(os.environ.get(RANK0_PID_ENV, "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the job's process group still reaches every rank
        pass
    if rank0 and os.getppid() != rank0:
        sys.exit(1)


def stop_ranks(children: list[subprocess.Popen], grace_s: float = 10.0) -> list[int | None]:
    """Wait for the child ranks to end, SIGKILL those still running after ``grace_s``; their exit codes."""
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return [child.returncode for child in children]
