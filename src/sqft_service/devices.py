"""Whether a job asking for a CUDA GPU could get one, asked without importing torch into the service.

The API validates a new job before anything is queued: ``Training.device`` "cuda" where no job could
get a GPU is a 400 naming the field, not a job that fails later (or, worse, trains on the CPU).
*Where* is the runner's to say (``Runner.check_gpu``): the subprocess runner asks this machine, the
Ray runner asks the cluster, whose GPU nodes may be other machines than the service's. This machine
is asked without torch in the service process (docs/ARCHITECTURE.md): one short child process imports
torch and asks ``torch.cuda.is_available()`` (the same question the job process asks), once per
service process. The job process asks again itself (``training/device.py``): the GPU may have gone
away, or the node that got the job may not have one.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import TYPE_CHECKING

from .errors import InvalidConfigurationError

if TYPE_CHECKING:
    from .jobs.runner import Runner

_PROBE = "import torch; print(int(torch.cuda.is_available()))"
PROBE_TIMEOUT_S = 120  # a cold torch import on a busy 2-core machine takes seconds, not minutes


@functools.cache
def cuda_available() -> bool:
    """``torch.cuda.is_available()`` in the job processes' interpreter (cached for this process)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip().endswith("1")


def check_local_gpu() -> str | None:
    """None when this machine has a usable CUDA GPU, else why not (the subprocess runner's ``check_gpu``)."""
    if cuda_available():
        return None
    return "no CUDA GPU is available on this machine (torch.cuda.is_available() is false)"


def check_device_available(device: str, param: str = "Training.device", runner: Runner | None = None) -> None:
    """Refuse a device no job could train on.

    Args:
        device: ``Training.device``: "cpu", "cuda" or "auto" ("auto" always has a device to pick).
        param: The field named in the error.
        runner: Where jobs run (its ``check_gpu`` says whether a job can get a GPU); None: this machine.

    Raises:
        InvalidConfigurationError: ``device`` is "cuda" and no job could get a CUDA GPU.
    """
    if device != "cuda":
        return
    missing = runner.check_gpu() if runner is not None else check_local_gpu()
    if missing is not None:
        raise InvalidConfigurationError(
            f"`{param}` 'cuda': {missing}; use 'auto' (the GPU when the job gets one, else the CPU) or 'cpu'",
            param=param,
        )
