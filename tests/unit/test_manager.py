"""The job manager (jobs/manager.py) on a real store with real job processes: a launch the runner
refuses, the journal (read only for runners whose jobs cannot write the store), the resources a
fine-tune asks a runner for, and how ``recover`` settles the jobs a restart finds running.

The runners are the real :class:`SubprocessRunner` with the job command swapped for a few lines of
Python (or a refusal to start): the manager is the part under test, not the training job.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sqft_service.jobs.batch import batch_files
from sqft_service.jobs.manager import JobManager
from sqft_service.jobs.outcome import JobOutcome
from sqft_service.jobs.runner import LaunchError, LaunchSpec, worker_resources
from sqft_service.jobs.subprocess_runner import SubprocessHandle, SubprocessRunner
from sqft_service.settings import Settings
from sqft_service.store.db import Database
from sqft_service.store.events import EventStore
from sqft_service.store.files import FileStore
from sqft_service.store.ids import new_id
from sqft_service.store.jobs import FINE_TUNE, STOP_CANCEL, STOP_PAUSE, JobRecord, JobStore
from sqft_service.workspace import JobWorkspace

# What the stand-in job does: one journal record, then a succeeded outcome (an operation's result).
JOURNALLING_JOB = """
import sys
from pathlib import Path
from sqft_service.jobs.journal import JournalEvents
from sqft_service.jobs.outcome import JobOutcome
from sqft_service.workspace import JobWorkspace
workspace = JobWorkspace(Path(sys.argv[1]))
JournalEvents(workspace.journal).add_event(sys.argv[2], "journalled by the job")
JobOutcome(status="succeeded", result={"path": str(workspace.root)}).write(workspace.outcome)
"""


class JournallingRunner(SubprocessRunner):
    """The subprocess runner running JOURNALLING_JOB instead of the job worker."""

    def __init__(self, job_writes_store: bool) -> None:
        super().__init__()
        self.job_writes_store = job_writes_store
        self.argvs: list[list[str]] = []

    def submit(self, spec: LaunchSpec) -> SubprocessHandle:
        self.argvs.append(spec.argv)
        workspace = spec.argv[spec.argv.index("--workspace") + 1]
        return super().submit(replace(spec, argv=[sys.executable, "-c", JOURNALLING_JOB, workspace, spec.job_id]))


class RefusingRunner(SubprocessRunner):
    """A runner that cannot start the job: at submit, or (like Ray's asynchronous start) at the first poll."""

    def __init__(self, when: str) -> None:
        super().__init__()
        self.when = when
        self.specs: list[LaunchSpec] = []

    def submit(self, spec: LaunchSpec) -> SubprocessHandle:
        self.specs.append(spec)
        if self.when == "submit":
            raise LaunchError("no node has the data dir")
        return super().submit(replace(spec, argv=[sys.executable, "-c", "pass"]))

    def poll(self, handle: SubprocessHandle) -> int | None:
        handle.process.wait()
        raise LaunchError("no node has the data dir")


@pytest.fixture
def stores(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    db = Database(settings.db_path)
    yield settings, JobStore(db), EventStore(db), FileStore(db, settings.files_dir)
    db.close()


def queued_job(manager: JobManager, kind: str = "merge", config: dict | None = None) -> JobRecord:
    job = manager.create(new_id("op"), kind, config or {"output": "x"})
    manager.enqueue(job)
    return job


def run_to_end(manager: JobManager, job_id: str, timeout: float = 60) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.tick()
        job = manager.jobs.get(job_id)
        if job is not None and job.is_final:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not end within {timeout} s")


def messages(manager: JobManager, job_id: str) -> list[str]:
    return [e.message for e in manager.events.list_events(job_id, limit=100)[0]]


@pytest.mark.parametrize("job_writes_store", [False, True], ids=["journal", "store"])
def test_the_journal_is_read_only_for_jobs_that_cannot_write_the_store(stores, job_writes_store):
    runner = JournallingRunner(job_writes_store)
    manager = JobManager(*stores, runner=runner)
    job = queued_job(manager)
    done = run_to_end(manager, job.id)
    assert done.status == "succeeded"
    assert ("--journal" in runner.argvs[0]) is not job_writes_store
    # A job that writes the store keeps no journal: the manager does not read one (this one is planted).
    assert ("journalled by the job" in messages(manager, job.id)) is not job_writes_store


@pytest.mark.parametrize("when", ["submit", "poll"])
def test_a_launch_the_runner_refuses_fails_the_job_the_same_way_wherever_it_is_refused(stores, when):
    manager = JobManager(*stores, runner=RefusingRunner(when))
    job = queued_job(manager)
    failed = run_to_end(manager, job.id)
    assert failed.status == "failed"
    assert failed.error == {
        "code": "launch_failed",
        "message": "could not start the job process: no node has the data dir",
        "param": None,
        "user_error": False,
    }
    assert "Job failed: could not start the job process: no node has the data dir" in messages(manager, job.id)
    assert manager.running_count() == 0


def test_a_cuda_fine_tune_asks_the_runner_for_a_gpu_per_worker(stores):
    runner = RefusingRunner("submit")
    manager = JobManager(*stores, runner=runner)
    training = {"device": "cuda", "num_training_workers": 2, "resources_per_worker": {"CPU": 2}}
    run_to_end(manager, queued_job(manager, FINE_TUNE, {"Training": training}).id)
    run_to_end(manager, queued_job(manager).id)  # an operation names no resources
    fine_tune, operation = runner.specs
    assert (fine_tune.num_workers, fine_tune.resources_per_worker) == (2, {"CPU": 2, "GPU": 1})
    assert (operation.num_workers, operation.resources_per_worker) == (1, None)


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, {"CPU": 1}),
        ({"device": "auto"}, {"CPU": 1}),
        ({"device": "cuda"}, {"CPU": 1, "GPU": 1}),
        ({"device": "cuda", "resources_per_worker": {"CPU": 4, "accel": 1}}, {"CPU": 4, "accel": 1, "GPU": 1}),
        ({"device": "cuda", "resources_per_worker": {"GPU": 0.5}}, {"GPU": 0.5}),  # named: kept as asked
        ({"device": "cpu", "resources_per_worker": {"CPU": 2}}, {"CPU": 2}),
    ],
)
def test_worker_resources_add_a_gpu_only_for_cuda_when_none_is_named(training, expected):
    assert worker_resources(training) == expected


@pytest.mark.parametrize(
    ("stop_request", "outcome", "status", "noted"),
    [
        (0, "succeeded", "succeeded", True),
        (STOP_PAUSE, "succeeded", "succeeded", True),  # finished before the pause reached it
        (STOP_PAUSE, None, "paused", False),
        (STOP_CANCEL, "succeeded", "cancelled", False),  # a cancel wins over any outcome
        (0, None, "queued", False),  # cut short by the restart: runs again
    ],
)
def test_recover_settles_a_job_found_running_as_its_process_ended(stores, stop_request, outcome, status, noted):
    manager = JobManager(*stores, runner=SubprocessRunner())
    job = queued_job(manager)
    manager.jobs.update(job.id, status="running", cancel_requested=stop_request, attempts=1)
    workspace = JobWorkspace(Path(job.workspace)).create()
    if outcome is not None:
        JobOutcome(status=outcome, result={"path": str(workspace.root)}).write(workspace.outcome)

    manager.recover()

    assert manager.jobs.get(job.id).status == status
    said = messages(manager, job.id)
    assert ("The job process finished while the service was down" in said) is noted
    if status == "queued":
        assert any(m.startswith("Interrupted: the service stopped; queued again") for m in said)


def test_a_batch_whose_window_ends_in_the_queue_expires_keeping_what_it_answered(stores, tmp_path):
    """A batch queued again after its process died, past its window: never launched; the line it had
    answered stays its output, every other request becomes a ``batch_expired`` error line."""
    runner = JournallingRunner(job_writes_store=False)
    manager = JobManager(*stores, runner=runner)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {}} for i in range(3)]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = {"input_path": str(requests), "total": 3, "window_s": 60, "output_expires_after": None}
    job = manager.create(new_id("batch", "_"), "batch", config)
    out_path, _ = batch_files(manager.workspace(job).output.root)
    out_path.parent.mkdir(parents=True)
    answered = {"custom_id": "r1", "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": 4}}}}
    out_path.write_text(json.dumps(answered) + "\n")  # what the attempt before the crash wrote
    manager.jobs.update(job.id, created_at=job.created_at - 61)  # its window is over
    manager.enqueue(job)
    manager.tick()

    ended = manager.jobs.get(job.id)
    assert ended.status == "succeeded" and ended.result["expired"] is True and runner.argvs == []
    assert ended.result["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert ended.result["tokens"] == {"input_tokens": 4, "output_tokens": 0}
    errors = manager.files.get(ended.result["error_file_id"]).path.read_text().splitlines()
    rows = [json.loads(row) for row in errors]
    assert [r["custom_id"] for r in rows] == ["r0", "r2"]
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in rows)
    assert "Batch expired: its completion window ended before it started" in messages(manager, job.id)
