"""Whether a job asking for a CUDA GPU could get one, asked without importing torch into the service.

The API validates a new job before anything is queued: ``Training.device`` "cuda" where no job could
get a GPU is a 400 naming the field, not a job that fails later (or, worse, trains on the CPU).
*Where* is the runner's to say (``Runner.check_gpu``): the subprocess runner asks this machine, the
Ray runner asks the cluster, whose GPU nodes may be other machines than the service's. This machine
is asked without torch in the service process (docs/ARCHITECTURE.md): one short child process imports
torch and asks ``torch.cuda.is_available()`` (the same question the job process asks) and how many
GPUs it sees, once per service process. A data-parallel job whose workers train on GPUs takes one
GPU per worker (``Runner.check_gpu_workers``). The job process asks again itself
(``training/device.py``, ``jobs/local_ranks.py``): the GPU may have gone away, or the node that got the
job may not have one.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import TYPE_CHECKING

from .errors import InvalidConfigurationError

if TYPE_CHECKING:
    from .jobs.runner import Runner

_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
PROBE_TIMEOUT_S = 120  # a cold torch import on a busy 2-core machine takes seconds, not minutes


@functools.cache
def cuda_device_count() -> int:
    """The CUDA GPUs torch sees in the job processes' interpreter, 0 without CUDA (cached for this process)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    last = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    return int(last[0]) if last and last[0].isdigit() else 0


def cuda_available() -> bool:
    """``torch.cuda.is_available()`` in the job processes' interpreter."""
    return cuda_device_count() > 0


NO_LOCAL_GPU = "no CUDA GPU is available on this machine (torch.cuda.is_available() is false)"


def check_local_gpu() -> str | None:
    """None when this machine has a usable CUDA GPU, else why not (the subprocess runner's ``check_gpu``)."""
    return None if cuda_available() else NO_LOCAL_GPU


def cuda_refused(reason: str, param: str = "Training.device") -> InvalidConfigurationError:
    """The error for ``param`` 'cuda' where no GPU can be had, ``reason`` saying why (API, launcher, job)."""
    return InvalidConfigurationError(
        f"`{param}` 'cuda': {reason}; use 'auto' (the GPU when the job gets one, else the CPU) or 'cpu'",
        param=param,
    )


def gpus_short(gpus: int, workers: int, where: str) -> str | None:
    """Why ``workers`` data-parallel workers on GPUs can't run where ``gpus`` GPUs are, or None when they can.

    A worker on a GPU takes one GPU of its own: NCCL, which reduces the gradients between GPUs, refuses
    two ranks on one device, and two trainings sharing one GPU would be no faster than one.
    """
    if gpus == 0 or gpus >= workers:
        return None
    return (
        f"{workers} data-parallel workers on GPUs take one GPU each, and {where} has {gpus}; ask for at most "
        f"{gpus} worker(s), or `Training.device` 'cpu' to train on CPU cores"
    )


def too_few_gpus(workers: int, device: str, short: str, param: str = "Training.device") -> InvalidConfigurationError:
    """The error for ``workers`` GPU workers where :func:`gpus_short` said ``short``."""
    return InvalidConfigurationError(
        f"`Training.num_training_workers` {workers} with `{param}` '{device}': {short}",
        param="Training.num_training_workers",
    )


def check_device_available(
    device: str, param: str = "Training.device", runner: Runner | None = None, workers: int = 1
) -> None:
    """Refuse a device no job could train on, and more GPU workers than there are GPUs.

    Args:
        device: ``Training.device``: "cpu", "cuda" or "auto" ("auto" always has a device to pick).
        param: The field named in the error.
        runner: Where jobs run (its ``check_gpu`` and ``check_gpu_workers`` say whether a job can get a
            GPU, and a GPU per worker); None: this machine.
        workers: ``Training.num_training_workers``.

    Raises:
        InvalidConfigurationError: ``device`` is "cuda" and no job could get a CUDA GPU (naming ``param``),
            or the job's workers would train on GPUs and there are fewer GPUs than workers (naming
            ``Training.num_training_workers``).
    """
    if device == "cpu":
        return
    if device == "cuda":
        missing = runner.check_gpu() if runner is not None else check_local_gpu()
        if missing is not None:
            raise cuda_refused(missing, param)
    if workers > 1:
        if runner is not None:
            short = runner.check_gpu_workers(device, workers)
        else:
            short = gpus_short(cuda_device_count(), workers, "this machine")
        if short is not None:
            raise too_few_gpus(workers, device, short, param)
