from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.settings import Settings
from tests.helpers import alpaca_records, wait_until, write_json

# The service loads models only under its model roots (model_access.py); the tests build theirs in
# pytest's temporary directory, so that directory is a root of every service they start.
PYTEST_TMP_ROOT: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _pytest_tmp_root(tmp_path_factory) -> None:
    PYTEST_TMP_ROOT[:] = [tmp_path_factory.getbasetemp()]


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(
        data_dir=data_dir,
        poll_interval_s=0.1,
        cancel_grace_s=5.0,
        threads_per_job=1,
        model_roots=tuple(PYTEST_TMP_ROOT),
    ).with_overrides(**overrides)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "sqft-data"


@pytest.fixture
def client(data_dir) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(data_dir))) as c:
        yield c


def upload(client: TestClient, path: Path, purpose: str = "fine-tune", filename: str | None = None) -> dict:
    with open(path, "rb") as handle:
        resp = client.post("/v1/files", files={"file": (filename or path.name, handle)}, data={"purpose": purpose})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture
def train_file(client, tmp_path) -> dict:
    return upload(client, write_json(tmp_path / "train.json", alpaca_records(16)))


def wait_status(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    def check():
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, what=f"job {job_id} to reach {statuses}")
