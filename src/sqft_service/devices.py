"""Whether this machine can train on a GPU, asked without importing torch into the service process.

The API validates a new job before anything is queued: ``Training.device`` "cuda" on a machine
without a usable GPU is a 400 naming the field, not a job that fails later (or, worse, trains on
the CPU). The service process stays torch-free (docs/ARCHITECTURE.md), so the answer comes from one
short child process that imports torch and asks ``torch.cuda.is_available()`` — the same question
the job process asks — once per service process. The job process asks again itself
(``training/device.py``): the GPU may have gone away, or the job may run on another machine.
"""

from __future__ import annotations

import functools
import subprocess
import sys

from .errors import InvalidConfigurationError

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


def check_device_available(device: str, param: str = "Training.device") -> None:
    """Refuse a device this machine cannot train on.

    Args:
        device: ``Training.device``: "cpu", "cuda" or "auto" ("auto" always has a device to pick).
        param: The field named in the error.

    Raises:
        InvalidConfigurationError: ``device`` is "cuda" and no CUDA GPU is usable here.
    """
    if device == "cuda" and not cuda_available():
        raise InvalidConfigurationError(
            f"`{param}` 'cuda': no CUDA GPU is available on this machine (torch.cuda.is_available() is false); "
            "use 'auto' (the GPU when there is one, else the CPU) or 'cpu'",
            param=param,
        )
