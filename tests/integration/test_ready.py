"""GET /ready: each check fails under the real condition it is there for, and /ready recovers with it.

Conditions, all real: another connection holding SQLite's write lock; the job workspaces' directory
replaced by a file; the data dir made read-only by a read-only bind mount over it (`chmod` would not stop
root, a bind mount does; it needs root, so that case is skipped elsewhere); a free-space threshold above
what the disk has; the job manager stopped through its own shutdown.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.integration.conftest import make_settings

CHECKS = {"database", "data_dir", "disk", "job_manager"}


def failing(client: TestClient) -> dict[str, str]:
    """The failing checks' errors, asserting the status code agrees with them."""
    resp = client.get("/ready")
    body = resp.json()
    assert set(body["checks"]) == CHECKS, body
    errors = {name: c["error"] for name, c in body["checks"].items() if not c["ok"]}
    assert (resp.status_code, body["status"]) == ((503, "not_ready") if errors else (200, "ready")), body
    assert client.get("/health").status_code == 200  # alive, ready or not
    return errors


def test_ready_fails_for_a_locked_database_and_an_unwritable_data_dir_then_recovers(data_dir):
    settings = make_settings(data_dir)
    with TestClient(create_app(settings)) as client:
        assert failing(client) == {}

        other = sqlite3.connect(settings.db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a writer that does not let go
        try:
            errors = failing(client)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert list(errors) == ["database"] and "locked" in errors["database"]
        assert failing(client) == {}

        jobs, aside = settings.jobs_dir, data_dir / "jobs-aside"
        jobs.rename(aside)
        jobs.write_text("not a directory")  # where job workspaces are made: no job could start
        try:
            errors = failing(client)
        finally:
            jobs.unlink()
            aside.rename(jobs)
        assert list(errors) == ["data_dir"] and "Not a directory" in errors["data_dir"]
        assert str(data_dir) not in errors["data_dir"]  # /ready is open: no paths
        assert failing(client) == {}


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def test_ready_fails_while_the_data_dir_is_read_only(data_dir):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    with TestClient(create_app(make_settings(data_dir))) as client:
        assert failing(client) == {}
        # Bind the data dir onto itself, then make that mount read-only: new files fail with EROFS, even
        # for root. SQLite keeps writing through the files it opened before, on the mount below.
        if _mount("--bind", str(data_dir), str(data_dir)).returncode != 0:
            pytest.skip("bind mounts are not permitted here")
        try:
            remount = _mount("-o", "remount,bind,ro", str(data_dir))
            assert remount.returncode == 0, remount.stderr
            errors = failing(client)
        finally:
            subprocess.run(["umount", str(data_dir)], check=True)
        assert list(errors) == ["data_dir"] and "Read-only file system" in errors["data_dir"]
        assert failing(client) == {}


def test_ready_fails_below_the_free_space_threshold(data_dir):
    free_mb = shutil.disk_usage(data_dir.parent).free // (1024 * 1024)
    with TestClient(create_app(make_settings(data_dir, min_free_disk_mb=free_mb + 1024**2))) as client:
        errors = failing(client)
    assert list(errors) == ["disk"] and "SQFT_MIN_FREE_DISK_MB" in errors["disk"]


def test_ready_fails_once_the_job_manager_stops(data_dir):
    with TestClient(create_app(make_settings(data_dir))) as client:
        assert failing(client) == {}
        client.app.state.job_manager.shutdown()  # what the service does on its way down
        errors = failing(client)
        assert list(errors) == ["job_manager"] and "queued jobs would not start" in errors["job_manager"]
