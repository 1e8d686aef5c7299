"""The embedded runner: each job is a ``python -m sqft_service.jobs.worker`` process in its own session.

Its own session (process group) means cancel reaches every process the job started (tokenizer
threads, data workers), and a crash of the job cannot take the API process with it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass

from ..devices import check_local_gpu, gpus_short
from .gpus import GpuPool, visible_gpus
from .runner import LaunchSpec

log = logging.getLogger(__name__)


@dataclass
class SubprocessHandle:
    job_id: str
    process: subprocess.Popen

    @property
    def pid(self) -> int | None:
        return self.process.pid


class SubprocessRunner:
    # A job process is the service's child: shutdown stops it, and the next start resumes the job.
    jobs_outlive_service = False
    job_writes_store = True

    def __init__(self, gpu_ids: list[str] | None = None) -> None:
        """``gpu_ids``: the GPUs to hand out to jobs (default: those this machine shows the service)."""
        self._gpu_ids = gpu_ids
        self._gpus: GpuPool | None = None
        self._gpus_lock = threading.Lock()  # the API's check and the manager's launch may ask first at once

    @property
    def gpus(self) -> GpuPool:
        with self._gpus_lock:
            if self._gpus is None:  # asked at the first launch or check, not at start-up (the probe imports torch)
                self._gpus = GpuPool(self._gpu_ids if self._gpu_ids is not None else visible_gpus())
            return self._gpus

    def gpu_load(self) -> dict[str, int] | None:
        """Jobs holding each GPU handed out, or None before the first launch asked which GPUs there are
        (a /metrics scrape does not start the torch probe)."""
        return self._gpus.load() if self._gpus is not None else None

    def submit(self, spec: LaunchSpec) -> SubprocessHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = spec.env
        chosen = self.gpus.take(spec.job_id, spec.gpus) if spec.gpus else []
        # GPUs the operator listed (SQFT_JOB_GPUS) are the only ones any job sees: "" hides the others.
        if chosen or self._gpu_ids is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(chosen)}
        if chosen:
            log.info("job %s gets GPU(s) %s", spec.job_id, ",".join(chosen), extra={"job_id": spec.job_id})
        with open(spec.log_path, "ab") as log_file:
            process = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return SubprocessHandle(spec.job_id, process)

    def poll(self, handle: SubprocessHandle) -> int | None:
        code = handle.process.poll()
        if code is not None and self._gpus is not None:
            self._gpus.release(handle.job_id)
        return code

    def _signal_group(self, handle: SubprocessHandle, sig: int) -> None:
        try:
            os.killpg(handle.process.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self, handle: SubprocessHandle) -> None:
        self._signal_group(handle, signal.SIGTERM)

    def kill(self, handle: SubprocessHandle) -> None:
        self._signal_group(handle, signal.SIGKILL)

    def attach(self, job_id: str, pid: int | None) -> None:
        """A job process cannot be watched across a restart (it is no longer our child): kill what is
        left of it, so the job is settled from its outcome or runs again, never twice at once."""
        if pid and kill_orphan_job(pid, job_id):
            log.warning("killed orphaned process %s of job %s", pid, job_id, extra={"job_id": job_id})

    def check_gpu(self) -> str | None:
        """Jobs run on this machine: whether torch sees a CUDA GPU here (asked in a child process), and
        whether the operator lets jobs have one (SQFT_JOB_GPUS)."""
        if self._gpu_ids == []:
            return "SQFT_JOB_GPUS is `none`: this service gives its jobs no GPU"
        return check_local_gpu()

    def check_gpu_workers(self, device: str, workers: int) -> str | None:
        """The ranks run on this machine, one GPU each of those handed out to jobs when there are any
        ("cuda" or "auto"; jobs/local_ranks.py)."""
        where = "this machine" if self._gpu_ids is None else "SQFT_JOB_GPUS"
        return gpus_short(len(self.gpus.ids), workers, where)


def kill_orphan_job(pid: int, job_id: str) -> bool:
    """Kill a job process left by an earlier service run, if that pid is still our worker for ``job_id``.

    The pid may have been reused by an unrelated process, so the command line must name the job.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if "sqft_service.jobs.worker" not in cmdline or job_id not in cmdline:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
