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
        inference_dtype="fp32",  # as tests/conftest.py says
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


def fine_tune_briefly(client: TestClient, model_dir: Path, directory: Path, steps: int = 1) -> dict:
    """A few steps of fine-tuning ``model_dir`` on Alpaca records, so that the caller's project may use it
    as a model (a base is a project's once it has fine-tuned it: ModelService); the succeeded job."""
    training = upload(client, write_json(directory / "brief.json", alpaca_records(8)))
    body = {"model": str(model_dir), "training_file": training["id"], "Training": {"max_train_steps": steps}}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    return done


def wait_status(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    def check():
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, what=f"job {job_id} to reach {statuses}")


def one_thread_server(data_dir: Path):
    """A real ``sqft serve`` process (not started) whose jobs and engine use one torch thread each."""
    from tests.server import Server

    return Server(
        data_dir, SQFT_MODEL_ROOTS=str(PYTEST_TMP_ROOT[0]), SQFT_THREADS_PER_JOB="1", SQFT_INFERENCE_THREADS="1"
    )


@pytest.fixture
def sdk(tmp_path):
    """The official ``openai`` SDK against :func:`one_thread_server`."""
    from openai import OpenAI

    server = one_thread_server(tmp_path / "data")
    server.start()
    try:
        yield OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    finally:
        server.stop()


def sdk_job_end(client, job_id: str, timeout: float = 240):
    """The SDK's job object once it has succeeded or failed."""
    return wait_until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed") and j,
        timeout,
        what="the job to finish",
    )


def assert_job_refused(client: TestClient, body: dict, change: dict, other_file: str, param: str, words: str) -> None:
    """``body`` with ``change`` applied (a None value drops the key; "sft" stands for ``other_file``) is a
    400 naming ``param`` with ``words`` in its message, and no job is created."""
    body = dict(body)
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = other_file if value == "sft" else value
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created
