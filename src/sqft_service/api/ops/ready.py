"""Readiness (``GET /ready``): can this service take work and run it now? ``/health`` only says the
process answers.

Each check does the real thing on a small scale: a write transaction on the database, a file written
and synced in every directory the service writes to, the free space of the data dir's file system, the
job manager's thread. A failed check names the problem without paths (``/ready`` needs no key); the
log gets the details.

With the Ray runner (``SQFT_RUNNER=ray``) a ``ray_cluster`` check asks the cluster for its live nodes.
Plug-in point: checks of what does not exist yet belong here too, e.g. the configured GPU being
visible (once jobs can be given one).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

from ...jobs.manager import JobManager
from ...settings import Settings
from ...store.db import Database

log = logging.getLogger(__name__)
# Writers hold the database for milliseconds; a lock held this long is a stuck writer.
DB_LOCK_WAIT_S = 2.0


class NotReady(Exception):
    """A check's failure, with a message safe to show to anyone."""


def check_database(db: Database) -> None:
    """Take the write lock (BEGIN IMMEDIATE) and roll back: fails on a closed, locked or read-only database."""
    try:
        db.check_writable(DB_LOCK_WAIT_S)
    except sqlite3.Error as exc:
        raise NotReady(f"the database takes no writes: {exc}") from exc


def check_writable(directories: list[Path]) -> None:
    """Write, sync and remove a small file in each directory (uploads, job workspaces, converted models)."""
    for directory in directories:
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".ready-") as probe:
                probe.write(b"ready")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            log.warning("readiness: cannot write in %s: %s", directory, exc)
            raise NotReady(f"the data dir is not writable: {exc.strerror or type(exc).__name__}") from exc


def check_disk(data_dir: Path, min_free_mb: int) -> None:
    try:
        free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
    except OSError as exc:
        raise NotReady(f"the data dir's file system cannot be read: {exc.strerror}") from exc
    if free_mb < min_free_mb:
        raise NotReady(f"{free_mb} MiB free on the data dir's file system, under SQFT_MIN_FREE_DISK_MB={min_free_mb}")


def check_job_manager(manager: JobManager) -> None:
    if not manager.is_alive():
        raise NotReady("the job manager is not running: queued jobs would not start")


def check_runner(manager: JobManager) -> None:
    """A runner with a cluster behind it (Ray) says whether the cluster answers."""
    problem = manager.runner.check()  # type: ignore[attr-defined]
    if problem:
        raise NotReady(problem)


def readiness(settings: Settings, db: Database, manager: JobManager) -> dict[str, dict]:
    """Every check's result, ``{"ok": true}`` or ``{"ok": false, "error": ...}``, by name."""
    data_dirs = [settings.data_dir, settings.files_dir, settings.jobs_dir, settings.model_cache_dir]
    checks: dict[str, Callable[[], None]] = {
        "database": lambda: check_database(db),
        "data_dir": lambda: check_writable(data_dirs),
        "disk": lambda: check_disk(settings.data_dir, settings.min_free_disk_mb),
        "job_manager": lambda: check_job_manager(manager),
    }
    if settings.runner == "ray":
        checks["ray_cluster"] = lambda: check_runner(manager)
    results: dict[str, dict] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = {"ok": True}
        except NotReady as exc:
            results[name] = {"ok": False, "error": str(exc)}
    return results
