"""Job lifecycle for every job kind: queue, launch, watch, cancel, finish, recover.

``validating_files -> queued -> running -> succeeded | failed | cancelled`` (and ``running -> paused
-> queued`` for a paused fine-tune). A background thread launches queued jobs while fewer than
``max_concurrent_jobs`` run, polls the running ones and records how each ended from its
:class:`JobOutcome`. State lives in SQLite, so a restarted service finds every job.

A job cut short without an outcome (the service restarted or was killed, or the job process died) is
queued again, up to ``max_job_attempts`` launches: a fine-tune resumes from its most advanced
resumable checkpoint (``training/resume.py``), an operation (extract / merge / sparsify) runs again
(it is idempotent: it publishes its output with one rename). A job whose process finished while the
service was down keeps its outcome; an orphaned job process is killed.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inference.engine import DTYPE_ENV
from ..model_access import ModelAccess
from ..model_names import fine_tuned_name
from ..settings import Settings
from ..store.events import EventStore
from ..store.files import FileStore
from ..store.ids import now
from ..store.jobs import FINE_TUNE, STOP_CANCEL, STOP_PAUSE, JobRecord, JobStore
from ..threads import job_environment, job_thread_budget
from ..workspace import JobWorkspace, write_atomically
from .gpus import gpus_wanted
from .journal import ingest
from .kinds import DISPLAY_NAMES, batch_deadline
from .outcome import JobError, JobOutcome
from .runner import LaunchError, LaunchSpec, RunHandle, Runner, worker_resources
from .subprocess_runner import SubprocessRunner

log = logging.getLogger(__name__)
# How often the manager's loop deletes expired files (OpenAI's expiry is to the hour, not the second).
EXPIRY_SWEEP_S = 60.0


@dataclass
class _Running:
    handle: RunHandle
    journal: Path
    term_sent_at: float | None = None
    # Bytes of the job's journal stored so far (jobs/journal.py); reading it again from 0 adds nothing twice.
    journal_offset: int = 0
    # The pid stored for the job; a runner that starts jobs asynchronously (Ray) learns it at a later poll.
    pid: int | None = None


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
        self._next_expiry_sweep = 0.0  # at the first tick
        # More periodic sweeps, with the expired files' (the app's: stored completions' retention).
        self.sweeps: list[Callable[[], object]] = []

    @staticmethod
    def workspace(job: JobRecord) -> JobWorkspace:
        return JobWorkspace(Path(job.workspace))

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="sqft-job-manager", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop and the running jobs; each is queued again (a fine-tune resumes where it stopped).

        Job processes get SIGTERM first: a fine-tune then writes its resume point at the next step
        boundary. Whatever still runs after the grace period is killed.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.runner.jobs_outlive_service:
                # Ray keeps running them; the next start re-attaches (recover -> runner.attach).
                for job_id in self._running:
                    self.events.add_event(job_id, "The service stopped; the job keeps running on the Ray cluster")
                self._running.clear()
                return
            for running in self._running.values():
                self.runner.terminate(running.handle)
            deadline = time.monotonic() + self.settings.cancel_grace_s
            while time.monotonic() < deadline and any(
                self.runner.poll(r.handle) is None for r in self._running.values()
            ):
                time.sleep(0.05)
            for job_id, running in list(self._running.items()):
                self.runner.kill(running.handle)
                job = self.jobs.get(job_id)
                if job is not None:
                    self._settle(job, None, interrupted=("service_stopped", "the service was shut down"))
            self._running.clear()

    def is_alive(self) -> bool:
        """Whether the manager thread runs (GET /ready): without it nothing queued would ever start."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def running_count(self) -> int:
        """Job processes this manager has started and not yet reaped (GET /metrics). Read without the lock
        (len of a dict is atomic), so a scrape never waits for a launch or a shutdown."""
        return len(self._running)

    def recover(self) -> None:
        """Make the store consistent after a restart (or a crash of the previous service)."""
        for job in self.jobs.with_status("running"):
            handle = self.runner.attach(job.id, job.pid)
            if handle is not None:  # still running (Ray): watch it again; the loop settles it when it ends
                running = self._running[job.id] = _Running(handle, self.workspace(job).journal, pid=handle.pid)
                self.events.add_event(job.id, "The service restarted and re-attached to the running job")
                if job.stop_request:  # a cancel or pause asked for before the restart
                    self.runner.terminate(handle)
                    running.term_sent_at = time.monotonic()
                continue
            # Read even when this runner's jobs write the store (once per job and start): a journal here
            # is from a job launched under the Ray runner before the service restarted with another one.
            ingest(self.workspace(job).journal, 0, job.id, self.events, self.jobs)
            self._settle(
                job,
                JobOutcome.read(self.workspace(job).outcome),
                interrupted=("service_restarted", "the service stopped"),
                applied_note="The job process finished while the service was down",
            )
        for job in self.jobs.with_status("validating_files"):
            self.jobs.update(job.id, status="queued")

    def _settle(
        self,
        job: JobRecord,
        outcome: JobOutcome | None,
        *,
        interrupted: tuple[str, str],
        applied_note: str | None = None,
    ) -> None:
        """Record how a job's process ended: cancel and pause requests first, then its outcome; a process
        that ended without one (or was stopped by the service itself) was interrupted.

        Args:
            job: The job as stored.
            outcome: What its process wrote, or None.
            interrupted: The error code and reason when it was cut short.
            applied_note: An event added just before the outcome is applied (and only then).
        """
        if job.cancel_requested:
            self._finish_cancelled(job.id)
        elif job.pause_requested and (outcome is None or outcome.status == "stopped"):
            self.jobs.update(job.id, status="paused", pid=None, estimated_finish=None)
            self.events.add_event(job.id, "Job paused: resume it to continue from where it stopped")
        elif outcome is not None and outcome.status != "stopped":
            if applied_note:
                self.events.add_event(job.id, applied_note)
            self._apply_outcome(job, outcome)
        else:
            self._interrupted(job, *interrupted)

    def _interrupted(self, job: JobRecord, code: str, reason: str) -> None:
        """Queue a job cut short again, unless it has used up its launches."""
        if job.attempts >= self.settings.max_job_attempts:
            message = (
                f"The job was interrupted on each of its {job.attempts} launches (last: {reason}); "
                "see its log (GET .../log)"
            )
            self._fail(job.id, JobError(code=code, message=message))
            return
        self.jobs.update(job.id, status="queued", pid=None, estimated_finish=None, only_if_status=("running",))
        what = "it will resume from its last checkpoint" if job.kind == FINE_TUNE else "it will run again"
        self.events.add_event(job.id, f"Interrupted: {reason}; queued again, {what}", level="warn")

    # --------------------------------------------------------------- actions
    def enqueue(self, job: JobRecord) -> None:
        self.jobs.update(job.id, status="queued", only_if_status=("validating_files",))
        self.events.add_event(job.id, f"{DISPLAY_NAMES[job.kind]} queued")
        self._wake.set()

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job; a running one gets SIGTERM now and SIGKILL after the grace period."""
        with self._lock:
            job = self.jobs.get(job_id)
            assert job is not None  # the API checked it exists
            if job.status in ("validating_files", "queued", "paused"):
                if self.jobs.update(
                    job_id,
                    status="cancelled",
                    finished_at=now(),
                    only_if_status=("validating_files", "queued", "paused"),
                ):
                    self.events.add_event(job_id, f"{DISPLAY_NAMES[job.kind]} cancelled before it started")
            elif job.status == "running":
                self.jobs.update(job_id, cancel_requested=STOP_CANCEL)
                running = self._running.get(job_id)
                if running is not None and running.term_sent_at is None:
                    self.runner.terminate(running.handle)
                    running.term_sent_at = time.monotonic()
                    self.events.add_event(job_id, "Cancellation requested: stopping the job process")
        self._wake.set()
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    def pause(self, job_id: str) -> JobRecord:
        """Pause a fine-tune: a queued one at once; a running one stops at the next step, keeping its state."""
        with self._lock:
            job = self.jobs.get(job_id)
            assert job is not None  # the API checked it exists and can be paused
            if job.status in ("validating_files", "queued"):
                if self.jobs.update(job_id, status="paused", only_if_status=("validating_files", "queued")):
                    self.events.add_event(job_id, "Job paused before it started")
            elif job.status == "running" and not job.stop_request:
                self.jobs.update(job_id, cancel_requested=STOP_PAUSE)
                running = self._running.get(job_id)
                if running is not None and running.term_sent_at is None:
                    self.runner.terminate(running.handle)
                    running.term_sent_at = time.monotonic()
                    self.events.add_event(job_id, "Pause requested: the job stops after the current step")
        self._wake.set()
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    def resume(self, job_id: str) -> JobRecord:
        """Queue a paused job again; it continues from the state it saved when it paused."""
        if self.jobs.update(job_id, status="queued", cancel_requested=0, only_if_status=("paused",)):
            self.events.add_event(job_id, "Job resumed: queued")
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
        if time.monotonic() >= self._next_expiry_sweep:
            self._next_expiry_sweep = time.monotonic() + EXPIRY_SWEEP_S
            self.delete_expired_files()
            for sweep in self.sweeps:
                sweep()

    def delete_expired_files(self) -> list[str]:
        """Delete the files past their ``expires_at`` that no job will read any more (one a job still
        reads goes once that job has ended); their ids."""
        deleted = []
        for file_id in self.files.expired(now()):
            if not self.jobs.referencing_file(file_id) and self.files.delete(file_id):
                deleted.append(file_id)
        if deleted:
            log.info("deleted %d expired file(s): %s", len(deleted), ", ".join(deleted[:10]))
        return deleted

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            try:
                code = self.runner.poll(running.handle)
            except LaunchError as exc:  # a runner that starts jobs asynchronously (Ray) found it cannot
                del self._running[job_id]
                self._launch_failed(job_id, exc)
                continue
            if running.handle.pid != running.pid:
                running.pid = running.handle.pid
                self.jobs.update(job_id, pid=running.pid)
            # After the poll: once the process has exited, everything it journalled is stored before it is
            # settled. A job that writes the store itself keeps no journal: nothing to open at every poll.
            if not self.runner.job_writes_store:
                running.journal_offset = ingest(running.journal, running.journal_offset, job_id, self.events, self.jobs)
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
        queued = [job for job in self.jobs.with_status("queued") if not self._expired_in_queue(job)]
        free = self.settings.max_concurrent_jobs - len(self._running)
        for job in queued[: max(0, free)]:
            self._launch(job)

    def _expired_in_queue(self, job: JobRecord) -> bool:
        """End a queued batch whose completion window is over, each of its requests a ``batch_expired``
        error line (OpenAI's ``expired``), as the batch job ends one whose window ends while it runs."""
        from .batch import batch_files, expire, read_results, request_lines

        if job.kind != "batch" or time.time() < batch_deadline(job.config, job.created_at):
            return False
        out_path, err_path = batch_files(self.workspace(job).output.root)
        err_path.parent.mkdir(parents=True, exist_ok=True)
        # A batch queued again after its process died keeps the lines it wrote before.
        done = {*read_results(out_path)[0], *read_results(err_path)[0]}
        lines = request_lines(Path(job.config["input_path"]))
        with err_path.open("a", encoding="utf-8") as err:
            expire(err, (line for line in lines if line["custom_id"] not in done))
        result = {"expired": True, **self._batch_files(job)}
        if self.jobs.update(job.id, status="succeeded", finished_at=now(), result=result, only_if_status=("queued",)):
            self.events.add_event(job.id, "Batch expired: its completion window ended before it started")
        return True

    def _launch(self, job: JobRecord) -> None:
        workspace = self.workspace(job).create()
        params = job.config
        if job.kind == "batch":  # the job stops answering at the end of the batch's window
            params = {**params, "expires_at": batch_deadline(job.config, job.created_at)}
        spec = {"kind": job.kind, "params": params, "inputs": self._inputs(job)}
        write_atomically(workspace.spec, json.dumps(spec, indent=2))
        workspace.outcome.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(job_environment(job_thread_budget(self.settings.max_concurrent_jobs, self.settings.threads_per_job)))
        env["PYTHONUNBUFFERED"] = "1"
        # The job process checks the models it loads again: the API's roots, plus the service's own job outputs
        # (a fine-tune of a fine-tuned model loads its merged parent from there; model_access.py).
        env.update(ModelAccess.for_stored_models(self.settings).job_environment())
        env[DTYPE_ENV] = self.settings.inference_dtype  # a batch's answers computed as the routes compute them
        env["SQFT_CHECKPOINT_INTERVAL_S"] = str(self.settings.checkpoint_interval_s)
        # The settings' format, not the service's environment: create_app may have been given other settings.
        env["SQFT_LOG_FORMAT"] = self.settings.log_format
        argv = [
            sys.executable,
            "-m",
            "sqft_service.jobs.worker",
            "--job-id",
            job.id,
            "--db",
            str(self.settings.db_path.resolve()),
            "--workspace",
            str(workspace.root),
            "--model-cache",
            str(self.settings.model_cache_dir.resolve()),
        ]
        if not self.runner.job_writes_store:
            argv.append("--journal")
        training = job.config.get("Training", {}) if job.kind == FINE_TUNE else {}
        spec = LaunchSpec(
            job.id,
            argv,
            env,
            workspace.log,
            Path.cwd(),
            data_paths=[self.settings.files_dir.resolve(), self.settings.model_cache_dir.resolve()],
            num_workers=int(training.get("num_training_workers") or 1),
            resources_per_worker=worker_resources(training) if job.kind == FINE_TUNE else None,
            gpus=gpus_wanted(job.kind, job.config),
        )
        try:
            handle = self.runner.submit(spec)
        except (OSError, LaunchError) as exc:
            self._launch_failed(job.id, exc)
            return
        self._running[job.id] = _Running(handle, workspace.journal, pid=handle.pid)
        self.jobs.update(
            job.id,
            status="running",
            started_at=job.started_at or now(),
            pid=handle.pid,
            cancel_requested=0,
            attempts=job.attempts + 1,
        )
        again = f" again (launch {job.attempts + 1})" if job.attempts else ""
        self.events.add_event(job.id, f"{DISPLAY_NAMES[job.kind]} started{again}")

    def _inputs(self, job: JobRecord) -> list[dict[str, str]]:
        """The uploaded files the job reads, with the sha256 recorded at upload (checked by the job process)."""
        refs = [("training_file", job.training_file), ("validation_file", job.validation_file)]
        refs.append(("calibration_file", job.config.get("calibration_file")))
        refs.append(("input_file_id", job.config.get("input_file_id")))  # a batch's requests
        inputs = []
        for param, file_id in refs:
            record = self.files.get(file_id) if file_id else None
            if record is not None:
                inputs.append({"param": param, "file_id": record.id, "path": str(record.path), "sha256": record.sha256})
        return inputs

    # --------------------------------------------------------------- endings
    def _finish(self, job_id: str, exit_code: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        outcome = JobOutcome.read(self.workspace(job).outcome)
        if outcome is None:
            what = "job %s: its process exited with code %s without an outcome"
            log.warning(what, job_id, exit_code, extra={"job_id": job_id})
        self._settle(job, outcome, interrupted=("job_crashed", f"the job process died (exit code {exit_code})"))

    def _apply_outcome(self, job: JobRecord, outcome: JobOutcome) -> None:
        if outcome.status == "succeeded" and outcome.result is not None:
            self._succeed(job, outcome.result)
        elif outcome.status == "stopped":
            self._finish_cancelled(job.id)
        else:
            self._fail(job.id, outcome.error or JobError(code=f"{job.kind}_failed", message="no error reported"))

    def _succeed(self, job: JobRecord, result: dict) -> None:
        values: dict = {"result": result}
        if job.kind == FINE_TUNE:
            csv_path = Path(result["metrics_csv"])
            values.update(
                trained_tokens=int(result["trained_tokens"]),
                # OpenAI's model name; the adapter's path stays in `result` (adapter_dir).
                fine_tuned_model=fine_tuned_name(job.model or "", job.suffix, job.id),
                result_files=[self._register_result_file(job.id, csv_path, job.owner)] if csv_path.is_file() else [],
            )
        elif job.kind == "batch":
            values["result"] = {**result, **self._batch_files(job)}
        self.jobs.update(
            job.id,
            status="succeeded",
            finished_at=now(),
            estimated_finish=None,
            only_if_status=("running",),
            **values,
        )
        done = "The job has successfully completed" if job.kind == FINE_TUNE else f"{DISPLAY_NAMES[job.kind]} done"
        if result.get("expired"):
            done = "Batch expired: its completion window ended before every request was answered"
        self.events.add_event(job.id, done, data={"path": result.get("adapter_dir") or result.get("path")})

    def _register_result_file(
        self,
        job_id: str,
        path: Path,
        owner: str | None,
        filename: str | None = None,
        purpose: str = "fine-tune-results",
        expires_after: int | None = None,
    ) -> str:
        payload = path.read_bytes()
        fd, staged = tempfile.mkstemp(dir=self.files.files_dir, prefix=".staging-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        record = self.files.add(
            filename=filename or f"{job_id}-metrics.csv",
            purpose=purpose,
            staged_path=Path(staged),
            sha256=hashlib.sha256(payload).hexdigest(),
            meta={"job_id": job_id},
            owner=owner,  # the file belongs to the job's project, so its key can download it
            expires_after=expires_after,
        )
        return record.id

    def _batch_files(self, job: JobRecord) -> dict[str, Any]:
        """A batch's answers and errors so far as files of its project (OpenAI's ``batch_output``), and
        how many of each: at its end, and for a cancelled batch what it answered before it stopped."""
        from .batch import batch_files, read_results

        found: dict[str, Any] = {"output_file_id": None, "error_file_id": None}
        counts = {"total": int(job.config.get("total", 0)), "completed": 0, "failed": 0}
        out_path, err_path = batch_files(self.workspace(job).output.root)
        (answers, tokens), (failures, _) = read_results(out_path), read_results(err_path)
        for key, count, path, name, ids in (
            ("output_file_id", "completed", out_path, "output", answers),
            ("error_file_id", "failed", err_path, "errors", failures),
        ):
            counts[count] = len(ids)
            if counts[count]:
                found[key] = self._register_result_file(
                    job.id,
                    path,
                    job.owner,
                    f"{job.id}_{name}.jsonl",
                    purpose="batch_output",
                    expires_after=job.config.get("output_expires_after"),
                )
        return {**found, "request_counts": counts, "tokens": tokens}

    def _finish_cancelled(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        values: dict[str, Any] = {}
        if job is not None and job.kind == "batch":
            values["result"] = self._batch_files(job)
        self.jobs.update(job_id, status="cancelled", finished_at=now(), estimated_finish=None, **values)
        self.events.add_event(job_id, "Job cancelled")

    def _launch_failed(self, job_id: str, exc: Exception) -> None:
        """The runner could not start the job (at submit, or, for Ray, when the pending start settled)."""
        self._fail(job_id, JobError(code="launch_failed", message=f"could not start the job process: {exc}"))

    def _fail(self, job_id: str, error: JobError) -> None:
        self.jobs.update(
            job_id,
            status="failed",
            finished_at=now(),
            estimated_finish=None,
            error={**error.public(), "user_error": error.user_error},
        )
        self.events.add_event(job_id, f"Job failed: {error.message}", level="error")

    # ------------------------------------------------------------ creation
    def new_workspace(self, job_id: str) -> JobWorkspace:
        return JobWorkspace.for_job(self.settings.jobs_dir, job_id)

    def create(self, job_id: str, kind: str, config: dict, **fields: object) -> JobRecord:
        """Record a new job (status ``validating_files``); :meth:`enqueue` makes it runnable.

        Raises:
            QuotaExceededError: the job's project already has ``max_unfinished_jobs`` jobs not yet ended.
        """
        return self.jobs.create(
            job_id=job_id,
            kind=kind,
            config=config,
            workspace=str(self.new_workspace(job_id).root),
            max_unfinished=self.settings.max_unfinished_jobs,
            **fields,
        )
