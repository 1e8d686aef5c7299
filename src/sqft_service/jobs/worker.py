"""The job process: ``python -m sqft_service.jobs.worker --job-id ... --db ... --job-dir ...``.

Runs one training recipe and reports through a sink that appends to the service's SQLite store
(WAL lets the API read while we write). Its exit tells the manager how it ended:
0 = succeeded (``result.json`` written), 2 = the user's input was rejected, 1 = anything else;
``error.json`` carries a message fit for the job object, the traceback goes to the job log only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..store.db import Database
from ..store.events import EventStore
from ..store.jobs import JobStore

log = logging.getLogger("sqft_service.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2


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


def _user_errors() -> dict[type[BaseException], tuple[str, str | None]]:
    """The user-input errors a job can hit, each with its error ``code`` and default ``param``."""
    from ..adapters.lora import AdapterConfigError
    from ..training.data import DataValidationError
    from ..training.models import ModelLoadError

    return {
        DataValidationError: ("invalid_training_file", "training_file"),
        ModelLoadError: ("invalid_model", "model"),
        AdapterConfigError: ("invalid_configuration", None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sqft-worker")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--model-cache", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    stop = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        log.warning("received signal %s: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    threads = os.environ.get("SQFT_NUM_THREADS")
    import torch

    if threads:
        torch.set_num_threads(int(threads))

    from ..config import FinetuneConfig
    from ..training.recipe import TrainingStopped, run_training

    db = Database(args.db)
    sink = StoreSink(db, args.job_id)
    error_path = args.job_dir / "error.json"
    user_errors = _user_errors()
    try:
        cfg = FinetuneConfig.model_validate_json((args.job_dir / "config.json").read_text())
        output_dir = Path(cfg.General.output_dir or args.job_dir / "output")
        sink.message(f"job process started (pid {os.getpid()}, {torch.get_num_threads()} threads)")
        run_training(cfg, output_dir, sink, model_cache_dir=args.model_cache, should_stop=stop.is_set)
        return EXIT_OK
    except TrainingStopped as exc:
        sink.message(f"training stopped: {exc}", level="warn")
        return EXIT_FAILED
    except tuple(user_errors) as exc:
        log.error("%s", exc)
        code, param = next(v for t, v in user_errors.items() if isinstance(exc, t))
        param = getattr(exc, "param", None) or param
        error_path.write_text(json.dumps({"code": code, "message": str(exc), "param": param}))
        return EXIT_USER_ERROR
    except Exception as exc:
        traceback.print_exc()
        message = f"training failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        error_path.write_text(json.dumps({"code": "training_failed", "message": message[:1000], "param": None}))
        return EXIT_FAILED
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
