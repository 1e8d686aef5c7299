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
from ..training.events import EventSink, NullSink
from ..workspace import JobWorkspace
from . import local_ranks
from .journal import JournalEvents, JournalJobs
from .outcome import JobError, JobOutcome

log = logging.getLogger("sqft_service.worker")


class StoreSink:
    """An EventSink that writes events, checkpoints and job progress into the service's store, or, with
    ``journal``, into the job's journal that the service ingests (a Ray job: ``jobs/journal.py``)."""

    def __init__(
        self, db: Database | None, job_id: str, progress_every_s: float = 1.0, journal: Path | None = None
    ) -> None:
        if journal is not None:
            self.events: EventStore | JournalEvents = JournalEvents(journal)
            self.jobs: JobStore | JournalJobs = JournalJobs(journal)
        else:
            assert db is not None
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
    job_id: str,
    workspace: JobWorkspace,
    db: Database | None,
    model_cache_dir: Path | None,
    stop: threading.Event,
    *,
    sink: EventSink | None = None,
) -> JobOutcome:
    """Run the job described by ``workspace.spec`` and return how it ended (never raises for job errors).
    Without ``db`` it reports through the workspace's journal; a given ``sink`` replaces both.

    Raises:
        RankLost: another rank of this data-parallel job died: there is no outcome to give.
    """
    from ..training.distributed import RankLost
    from ..training.recipe import TrainingStopped
    from .tasks import TASKS, TaskContext

    if sink is None:
        sink = StoreSink(db, job_id, journal=None if db is not None else workspace.journal)
    spec = json.loads(workspace.spec.read_text())
    kind = spec["kind"]
    try:
        check_inputs(spec.get("inputs", []))
        threads = configure_torch_threads()
        sink.message(f"job process started (pid {os.getpid()}, {threads} threads)")
        ctx = TaskContext(workspace, sink, stop.is_set, model_cache_dir)
        return JobOutcome(status="succeeded", result=TASKS[kind](spec["params"], ctx))
    except RankLost:
        raise
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
    # Report through the workspace's journal, never opening the store (a Ray job on any node).
    parser.add_argument("--journal", action="store_true")
    # Ranks 1..N-1 of a data-parallel fine-tune, started by rank 0 (jobs/local_ranks.py).
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--store-port", type=int, default=None)
    parser.add_argument("--on-gpus", action="store_true")  # each rank on its own GPU (rank 0 decides)
    args = parser.parse_args(argv)
    log_format = os.environ.get("SQFT_LOG_FORMAT", "text")
    configure_logging(log_format, job_id=args.job_id, stream="stdout")
    if log_format == "json":
        _libraries_log_through_logging()
    workspace = JobWorkspace(args.workspace)
    spec = json.loads(workspace.spec.read_text())
    kind = spec["kind"]

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

    world_size = args.world_size if args.rank is not None else local_ranks.world_size_of(spec)
    if kind == "fine_tune" and not args.journal:
        # Under the Ray runner (--journal) Ray placed the job by its resources; here only "CPU" means anything.
        training = spec["params"].get("Training", {})
        try:
            local_ranks.check_local_resources(training)
            if world_size > 1 and args.rank is None:  # rank 0 decides where every rank trains
                args.on_gpus = local_ranks.ranks_on_gpus(training, world_size, local_ranks.local_gpu_count())
        except UserError as exc:
            log.error("%s", exc)
            write_outcome(workspace, JobOutcome(status="failed", error=JobError.from_user_error(exc)))
            return 0
    if world_size > 1 and args.rank is None and os.environ.get("SQFT_RAY_JOB"):
        # Under the Ray runner the ranks are Ray Train workers wherever Ray places them (jobs/ray_train.py).
        from .ray_train import run_with_ray_train

        return run_with_ray_train(args.job_id, workspace, args.model_cache, spec, stop)
    if world_size > 1:
        return _run_local_rank(args, list(argv if argv is not None else sys.argv[1:]), world_size, spec, stop)

    db = None if args.journal else Database(args.db)
    try:
        write_outcome(workspace, run_job(args.job_id, workspace, db, args.model_cache, stop))
    finally:
        if db is not None:
            db.close()
    return 0


def write_outcome(workspace: JobWorkspace, outcome: JobOutcome) -> None:
    """Publish how the job ended; a fine-tune that succeeded no longer needs its resume point."""
    outcome.write(workspace.outcome)
    if outcome.status == "succeeded":
        # The outcome is on disk: nothing will resume this job again, so its resume point is spent.
        shutil.rmtree(workspace.output.resume_state, ignore_errors=True)


def run_fine_tune_rank(
    workspace_dir: str | Path,
    db_path: str | Path | None,
    job_id: str,
    *,
    model_cache_dir: str | Path | None = None,
    stop: threading.Event | None = None,
) -> JobOutcome:
    """Run this process's rank of a fine-tune whose ``torch.distributed`` group is already initialised.

    What Ray Train's ``train_loop_per_worker`` calls in each worker (and the local launcher in each rank).
    Every rank trains its shard (``training/distributed.py``); rank 0 alone reports: events, checkpoints
    and progress through the store at ``db_path`` (``None``: the workspace's journal), the adapter,
    ``metrics.csv`` and ``outcome.json``. The other ranks write nothing and never open the store. Without
    a process group (or with one rank) this is an ordinary single-process fine-tune.

    Args:
        workspace_dir: The job's workspace (``jobs/<id>/``), the same path on every rank.
        db_path: The service's SQLite store, or ``None`` to report through the journal.
        job_id: The job's id.
        model_cache_dir: Where converted GGUF models are cached.
        stop: Set it (on rank 0) to stop every rank at the next step boundary, saving the resume point;
            the job then ends ``stopped``. Other ranks' events are ignored.

    Returns:
        How the job ended (the same on every rank; only rank 0 wrote it).

    Raises:
        RankLost: another rank died or stopped answering: the job was cut short and has no outcome;
            it resumes from its last resume point when run again.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    workspace = JobWorkspace(Path(workspace_dir))
    cache = Path(model_cache_dir) if model_cache_dir is not None else None
    stop = stop or threading.Event()
    if rank != 0:
        return run_job(job_id, workspace, None, cache, stop, sink=NullSink())
    db = Database(Path(db_path)) if db_path is not None else None
    try:
        outcome = run_job(job_id, workspace, db, cache, stop)
        write_outcome(workspace, outcome)
    finally:
        if db is not None:
            db.close()
    return outcome


def _run_local_rank(
    args: argparse.Namespace, argv: list[str], world_size: int, spec: dict[str, Any], stop: threading.Event
) -> int:
    """One rank of a data-parallel fine-tune on this machine (``jobs/local_ranks.py``); rank 0 starts the others."""
    import torch.distributed as dist

    from ..training.distributed import RankLost

    children: list = []
    outcome: JobOutcome | None = None
    try:
        if args.rank is None:  # rank 0: the process the runner started
            threads = local_ranks.rank_threads(spec["params"].get("Training", {}), world_size)
            os.environ.update(local_ranks.rank_environment(threads))
            store = local_ranks.open_store(world_size)
            children = local_ranks.start_ranks(argv, world_size, store.port, threads, on_gpus=args.on_gpus)
            log.info(
                "data-parallel: ranks 1-%d started (pids %s), %d thread(s) per rank, %s",
                world_size - 1,
                [c.pid for c in children],
                threads,
                f"GPUs 0-{world_size - 1} (NCCL)" if args.on_gpus else "on CPU cores (gloo)",
            )
            local_ranks.wait_for_ranks(store, children)
            local_ranks.join_group(0, world_size, store=store, on_gpus=args.on_gpus)
        else:
            local_ranks.die_with_rank0()
            local_ranks.join_group(args.rank, world_size, store_port=args.store_port, on_gpus=args.on_gpus)
        outcome = run_fine_tune_rank(
            args.workspace, None if args.journal else args.db, args.job_id, model_cache_dir=args.model_cache, stop=stop
        )
    except RankLost as exc:
        log.error("%s: the job was cut short and resumes from its last resume point", exc)
    finally:
        # The others finish their last step with rank 0; after a failure of rank 0 alone they would
        # wait in a collective, so they get little time.
        ended_together = outcome is not None and outcome.status in ("succeeded", "stopped")
        codes = local_ranks.stop_ranks(children, grace_s=30.0 if ended_together else 1.0)
        if any(codes):
            log.warning("data-parallel ranks 1-%d exited with %s", world_size - 1, codes)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if outcome is not None else 1


if __name__ == "__main__":
    sys.exit(main())
