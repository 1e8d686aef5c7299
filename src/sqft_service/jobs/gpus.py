"""The subprocess runner's GPUs: each job process that uses a GPU is given its own, least busy first.

Without this every job on a multi-GPU machine would take GPU 0 (torch's current device), so
``SQFT_MAX_CONCURRENT_JOBS=4`` on four GPUs would put four trainings on one card and leave three idle.
A job is given GPUs through ``CUDA_VISIBLE_DEVICES`` (it then sees them as ``cuda:0``, ``cuda:1``, ...):
a fine-tune that may train on a GPU (``Training.device`` not "cpu") one per data-parallel worker, a
merge, sparsify or evaluate job one (they use it when the model fits), an extract none (it only slices
saved tensors). The least busy GPUs are chosen; when every GPU is busy a job shares the least busy
one rather than wait, as before this existed. The GPUs are those the service sees: its own
``CUDA_VISIBLE_DEVICES`` if set, else all that torch counts (asked in a child process, and only on a
machine with an NVIDIA driver, so a CPU-only machine never pays for the probe). ``SQFT_JOB_GPUS``
narrows them (or names them: the settings' ``job_gpu_ids``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..devices import cuda_device_count

# Where an NVIDIA driver shows itself (device nodes, or the kernel module's /proc entry); without any,
# no GPU can be there and the torch probe is skipped.
NVIDIA_SIGNS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")


def nvidia_driver_present() -> bool:
    return any(Path(sign).exists() for sign in NVIDIA_SIGNS)


def gpus_wanted(kind: str, config: dict[str, Any]) -> int:
    """How many GPUs a job of ``kind`` with ``config`` may use."""
    if kind == "extract":
        return 0
    if kind != "fine_tune":
        return 1
    training = config.get("Training", {})
    return 0 if training.get("device") == "cpu" else int(training.get("num_training_workers") or 1)


def visible_gpus() -> list[str]:
    """The GPU ids this service may hand out (``CUDA_VISIBLE_DEVICES`` entries, or indices)."""
    if not nvidia_driver_present():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [g.strip() for g in listed.split(",") if g.strip()]
        return [] if not ids or ids[0] == "-1" else ids[: cuda_device_count()]
    return [str(i) for i in range(cuda_device_count())]


class GpuPool:
    """Which job holds which GPUs; ``take`` picks the least busy ones."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()  # the manager's thread changes it, /metrics reads it

    def take(self, job_id: str, wanted: int) -> list[str]:
        """GPUs for ``job_id``: ``wanted`` distinct ones (as many as there are, at most), least busy first."""
        with self._lock:
            self._held.pop(job_id, None)
            if not self.ids or wanted <= 0:
                return []
            load = self._load()
            chosen = sorted(self.ids, key=lambda gpu: (load[gpu], self.ids.index(gpu)))[:wanted]
            chosen.sort(key=self.ids.index)
            self._held[job_id] = chosen
            return list(chosen)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> dict[str, list[str]]:
        with self._lock:
            return {job: list(gpus) for job, gpus in self._held.items()}

    def load(self) -> dict[str, int]:
        """Jobs holding each GPU, zeros too."""
        with self._lock:
            return self._load()

    def _load(self) -> dict[str, int]:
        load = dict.fromkeys(self.ids, 0)
        for held in self._held.values():
            for gpu in held:
                load[gpu] += 1
        return load
