"""Job lifecycle: queue, launch, watch, cancel, finish.

``validating_files -> queued -> running -> succeeded | failed | cancelled``. A background thread
launches queued jobs while fewer than ``max_concurrent_jobs`` run, polls the running ones and
records how each ended. State lives in SQLite, so a restarted service finds every job; a job that
was running when the service died is marked failed (resume is a later feature) and its orphaned
process, if any, is killed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings
from ..store.events import EventStore
from ..store.files import FileStore
from ..store.ids import now
from ..store.jobs import JobRecord, JobStore
from .runner import LaunchSpec, RunHandle, Runner
from .subprocess_runner import SubprocessRunner, kill_orphan_job

log = logging.getLogger(__name__)

RESTART_MESSAGE = (
    "The service stopped while this job was running; resuming interrupted jobs is not supported yet, "
    "so it was marked failed. Create the job again to retrain (its checkpoints so far are still listed)."
)


@dataclass
class _Running:
    handle: RunHandle
    term_sent_at: float | None = None


class JobManager:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        events: EventStore,
        files: FileStore,
        runner: Runner | None = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.events = events
        self.files = files
        self.runner = runner or SubprocessRunner()
        self._running: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="sqft-job-manager", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; jobs still running are stopped and marked failed with the reason."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for job_id, running in list(self._running.items()):
                self.runner.kill(running.handle)
                self._fail(job_id, "service_stopped", RESTART_MESSAGE.replace("stopped", "was shut down", 1))
            self._running.clear()

    def recover(self) -> None:
        """Make the store consistent after a restart (or a crash of the previous service)."""
        for job in self.jobs.with_status("running"):
            if job.pid and kill_orphan_job(job.pid, job.id):
                log.warning("killed orphaned process %s of job %s", job.pid, job.id)
            if job.cancel_requested:
                self._finish_cancelled(job.id)
            else:
                self._fail(job.id, "service_restarted", RESTART_MESSAGE)
        for job in self.jobs.with_status("validating_files"):
            self.jobs.update(job.id, status="queued")

    # --------------------------------------------------------------- actions
    def enqueue(self, job: JobRecord) -> None:
        self.jobs.update(job.id, status="queued", only_if_status=("validating_files",))
        self.events.add_event(job.id, "Job queued")
        self._wake.set()

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job; a running one gets SIGTERM now and SIGKILL after the grace period."""
        with self._lock:
            job = self.jobs.get(job_id)
            assert job is not None  # the API checked it exists
            if job.status in ("validating_files", "queued"):
                if self.jobs.update(
                    job_id,
                    status="cancelled",
                    finished_at=now(),
                    only_if_status=("validating_files", "queued"),
                ):
                    self.events.add_event(job_id, "Job cancelled before it started")
            elif job.status == "running":
                self.jobs.update(job_id, cancel_requested=1)
                running = self._running.get(job_id)
                if running is not None and running.term_sent_at is None:
                    self.runner.terminate(running.handle)
                    running.term_sent_at = time.monotonic()
                    self.events.add_event(job_id, "Cancellation requested: stopping the job process")
        self._wake.set()
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive anything a single job does
                log.exception("job manager tick failed")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            self._reap()
            self._escalate_cancels()
            self._launch_queued()

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            code = self.runner.poll(running.handle)
            if code is None:
                continue
            del self._running[job_id]
            self._finish(job_id, code)

    def _escalate_cancels(self) -> None:
        grace = self.settings.cancel_grace_s
        for running in self._running.values():
            if running.term_sent_at is not None and time.monotonic() - running.term_sent_at > grace:
                self.runner.kill(running.handle)

    def _launch_queued(self) -> None:
        free = self.settings.max_concurrent_jobs - len(self._running)
        if free <= 0:
            return
        for job in self.jobs.with_status("queued")[:free]:
            self._launch(job)

    def _threads_per_job(self) -> int:
        if self.settings.threads_per_job:
            return self.settings.threads_per_job
        # Split the cores between concurrent jobs: oversubscribed OpenMP threads thrash.
        return max(1, (os.cpu_count() or 1) // self.settings.max_concurrent_jobs)

    def _launch(self, job: JobRecord) -> None:
        job_dir = Path(job.output_dir).parent
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "config.json").write_text(json.dumps(job.config, indent=2))
        (job_dir / "error.json").unlink(missing_ok=True)
        threads = str(self._threads_per_job())
        env = dict(os.environ)
        env.update(
            {
                "SQFT_NUM_THREADS": threads,
                "OMP_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        argv = [
            sys.executable,
            "-m",
            "sqft_service.jobs.worker",
            "--job-id",
            job.id,
            "--db",
            str(self.settings.db_path.resolve()),
            "--job-dir",
            str(job_dir.resolve()),
            "--model-cache",
            str(self.settings.model_cache_dir.resolve()),
        ]
        spec = LaunchSpec(job.id, argv, env, job_dir / "job.log", Path.cwd())
        try:
            handle = self.runner.submit(spec)
        except OSError as exc:
            self._fail(job.id, "launch_failed", f"could not start the job process: {exc}")
            return
        self._running[job.id] = _Running(handle)
        self.jobs.update(job.id, status="running", started_at=now(), pid=handle.pid)
        self.events.add_event(job.id, "Fine-tuning job started")

    # --------------------------------------------------------------- endings
    def _finish(self, job_id: str, code: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.cancel_requested:
            self._finish_cancelled(job_id)
            return
        job_dir = Path(job.output_dir).parent
        result_path = Path(job.output_dir) / "result.json"
        if code == 0 and result_path.is_file():
            self._succeed(job, json.loads(result_path.read_text()))
            return
        error_path = job_dir / "error.json"
        if error_path.is_file():
            err = json.loads(error_path.read_text())
            self._fail(job_id, err.get("code") or "training_failed", err["message"], err.get("param"))
        else:
            self._fail(
                job_id,
                "training_failed",
                f"the job process exited with code {code} without a result; see its log ({job_dir / 'job.log'})",
            )

    def _succeed(self, job: JobRecord, result: dict) -> None:
        result_files: list[str] = []
        csv_path = Path(result["metrics_csv"])
        if csv_path.is_file():
            result_files.append(self._register_result_file(job.id, csv_path))
        self.jobs.update(
            job.id,
            status="succeeded",
            finished_at=now(),
            trained_tokens=int(result["trained_tokens"]),
            fine_tuned_model=result["adapter_dir"],
            result_files=result_files,
            estimated_finish=None,
            only_if_status=("running",),
        )
        self.events.add_event(job.id, "The job has successfully completed", data={"adapter": result["adapter_dir"]})

    def _register_result_file(self, job_id: str, csv_path: Path) -> str:
        payload = csv_path.read_bytes()
        fd, staged = tempfile.mkstemp(dir=self.files.files_dir, prefix=".staging-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        record = self.files.add(
            filename=f"{job_id}-metrics.csv",
            purpose="fine-tune-results",
            staged_path=Path(staged),
            sha256=hashlib.sha256(payload).hexdigest(),
            meta={"job_id": job_id},
        )
        return record.id

    def _finish_cancelled(self, job_id: str) -> None:
        self.jobs.update(job_id, status="cancelled", finished_at=now(), estimated_finish=None)
        self.events.add_event(job_id, "Job cancelled")

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.jobs.update(
            job_id,
            status="failed",
            finished_at=now(),
            estimated_finish=None,
            error={"code": code, "message": message, "param": param},
        )
        self.events.add_event(job_id, f"Job failed: {message}", level="error")
