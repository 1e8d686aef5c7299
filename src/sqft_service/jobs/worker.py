"""The job process: ``python -m sqft_service.jobs.worker --job-id ... --db ... --workspace ...``.

Runs one job of any kind (``jobs/tasks.py``) and reports through a sink that appends to the service's
SQLite store (WAL lets the API read while we write). How it ended goes to ``outcome.json`` as a
:class:`JobOutcome`, the only thing the manager reads; a traceback goes to the job log only. A process
that dies without an outcome (killed, out of memory) is a crash as far as the manager is concerned.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..logs import configure_logging
from ..store.db import Database
from ..store.events import EventStore
from ..store.jobs import JobStore
from ..threads import configure_torch_threads
from ..workspace import JobWorkspace
from .outcome import JobError, JobOutcome

log = logging.getLogger("sqft_service.worker")


class StoreSink:
    """An EventSink that writes events, checkpoints and job progress into the service's store."""

    def __init__(self, db: Database, job_id: str, progress_every_s: float = 1.0) -> None:
        self.events = EventStore(db)
        self.jobs = JobStore(db)
        self.job_id = job_id
        self.progress_every_s = progress_every_s
        self._last_progress = 0.0

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        log.info("%s", text)
        self.events.add_event(self.job_id, text, level=level, type="message", data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        parts = [f"{k}={data[k]}" for k in ("step", "train_loss", "valid_loss", "tokens_per_s") if k in data]
        text = f"Step {data['step']}/{data['total_steps']}: " if "total_steps" in data else ""
        text += ", ".join(parts)
        log.info("%s", text)
        self.events.add_event(self.job_id, text, level="info", type="metrics", data=data)

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        self.events.add_checkpoint(self.job_id, step, path, metrics)
        self.events.add_event(self.job_id, f"Checkpoint saved at step {step}", data={"step": step, "path": path})

    def progress(self, trained_tokens: int, estimated_finish: float | None) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.progress_every_s:
            return
        self._last_progress = now
        self.jobs.update(
            self.job_id,
            trained_tokens=trained_tokens,
            estimated_finish=int(estimated_finish) if estimated_finish else None,
        )


class JobStopped(Exception):
    """SIGTERM reached a job whose task cannot stop between steps (extract, merge, sparsify)."""


class InputChanged(Exception):
    """An uploaded file the job reads is not the file that was uploaded (changed or lost on disk)."""


def check_inputs(inputs: list[dict[str, str]]) -> None:
    """Every input file still has the sha256 it was uploaded with."""
    for item in inputs:
        digest = hashlib.sha256()
        try:
            with open(item["path"], "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            raise InputChanged(f"`{item['param']}` {item['file_id']} is missing from the service's storage") from None
        if digest.hexdigest() != item["sha256"]:
            raise InputChanged(f"`{item['param']}` {item['file_id']} changed on disk since it was uploaded")


def run_job(
    job_id: str, workspace: JobWorkspace, db: Database, model_cache_dir: Path | None, stop: threading.Event
) -> JobOutcome:
    """Run the job described by ``workspace.spec`` and return how it ended (never raises for job errors)."""
    from ..training.recipe import TrainingStopped
    from .tasks import TASKS, TaskContext

    sink = StoreSink(db, job_id)
    spec = json.loads(workspace.spec.read_text())
    kind = spec["kind"]
    try:
        check_inputs(spec.get("inputs", []))
        threads = configure_torch_threads()
        sink.message(f"job process started (pid {os.getpid()}, {threads} threads)")
        ctx = TaskContext(workspace, sink, stop.is_set, model_cache_dir)
        return JobOutcome(status="succeeded", result=TASKS[kind](spec["params"], ctx))
    except (TrainingStopped, JobStopped) as exc:
        sink.message(f"stopped: {exc}", level="warn")
        return JobOutcome(status="stopped")
    except InputChanged as exc:
        log.error("%s", exc)
        return JobOutcome(status="failed", error=JobError(code="input_file_corrupted", message=str(exc)))
    except UserError as exc:
        log.error("%s", exc)
        return JobOutcome(status="failed", error=JobError.from_user_error(exc))
    except Exception as exc:
        log.exception("%s failed", kind)  # the traceback, in the job log's format (one JSON record in json mode)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{kind.replace('_', '-')} failed: {type(exc).__name__}: {first_line}"[:1000]
        return JobOutcome(status="failed", error=JobError(code=f"{kind}_failed", message=message))


def _libraries_log_through_logging() -> None:
    """transformers logs through its own stderr handler and draws tqdm bars; in json mode its records
    go to the root handler instead, and the bars (not log records) are off."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sqft-worker")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--model-cache", type=Path, default=None)
    args = parser.parse_args(argv)
    log_format = os.environ.get("SQFT_LOG_FORMAT", "text")
    configure_logging(log_format, job_id=args.job_id, stream="stdout")
    if log_format == "json":
        _libraries_log_through_logging()
    workspace = JobWorkspace(args.workspace)
    kind = json.loads(workspace.spec.read_text())["kind"]

    from .tasks import COOPERATIVE_STOP

    stop = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        stop.set()
        if kind in COOPERATIVE_STOP:
            log.warning("received signal %s: stopping after the current step", signum)
        else:
            raise JobStopped(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    db = Database(args.db)
    try:
        outcome = run_job(args.job_id, workspace, db, args.model_cache, stop)
        outcome.write(workspace.outcome)
        if outcome.status == "succeeded":
            # The outcome is on disk: nothing will resume this job again, so its resume point is spent.
            shutil.rmtree(workspace.output.resume_state, ignore_errors=True)
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
