"""Extract, merge and sparsify as jobs: async answers, the operations routes, cancel and restart of each kind.

The real app, real SQLite, real job processes on a tiny Llama. One NLS job is trained once per module;
a long fine-tune occupies the single job slot where a test needs an operation to stay queued.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import alpaca_records, write_json
from tests.integration.conftest import make_settings, upload, wait_status
from tests.integration.test_sqft_api import NLS_LORA_CONFIG

FAST = {"Training": {"max_train_steps": 2, "batch_size": 4, "learning_rate": 1e-3}}
# ~thousands of tiny steps: keeps the only job slot busy until the test cancels it.
SLOW = {"Training": {"epochs": 1000, "batch_size": 1, "learning_rate": 1e-3, "logging_steps": 1000}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> dict:
    """A data dir holding one succeeded NLS job and an uploaded training file."""
    tmp = tmp_path_factory.mktemp("ops")
    data_dir = tmp / "data"
    with TestClient(create_app(make_settings(data_dir))) as client:
        f = upload(client, write_json(tmp / "train.json", alpaca_records(16)))
        body = {"model": str(tiny_model_dir), "training_file": f["id"], "General": {"lora_config": NLS_LORA_CONFIG}}
        job = client.post("/v1/fine_tuning/jobs", json={**body, **FAST}).json()
        assert wait_status(client, job["id"], ("succeeded", "failed"))["status"] == "succeeded"
    return {"data_dir": data_dir, "job_id": job["id"], "file_id": f["id"], "model": str(tiny_model_dir)}


@pytest.fixture
def client(trained) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(trained["data_dir"]))) as c:
        yield c


def operation_request(kind: str, trained: dict, name: str) -> tuple[str, dict]:
    """The route and an async body for an operation of ``kind`` (``name`` keeps outputs apart)."""
    if kind == "extract":
        body = {"fine_tuning_job_id": trained["job_id"], "sub_adapter_version": name}
        body["custom_config"] = [8] * 6
        return "/v1/finetune/extract_adapter", body
    if kind == "merge":
        return "/v1/finetune/merge_adapter", {"fine_tuning_job_id": trained["job_id"]}
    return "/v1/finetune/sparsify", {"model": trained["model"], "method": "wanda", "output_name": name}


def submit_async(client: TestClient, kind: str, trained: dict, name: str) -> dict:
    route, body = operation_request(kind, trained, name)
    resp = client.post(route, json={**body, "wait": False})
    assert resp.status_code == 202, resp.text
    op = resp.json()
    assert op["object"] == "finetune.operation" and op["kind"] == kind and op["status"] == "queued"
    return op


def wait_op(client: TestClient, op_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    from tests.helpers import wait_until

    def check():
        op = client.get(f"/v1/finetune/operations/{op_id}").json()
        return op if op["status"] in statuses else None

    return wait_until(check, timeout, interval=0.05, what=f"operation {op_id} to reach {statuses}")


def start_blocker(client: TestClient, trained: dict) -> str:
    body = {"model": trained["model"], "training_file": trained["file_id"], **SLOW}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    wait_status(client, job["id"], ("running",))
    return job["id"]


def messages(client: TestClient, op_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"/v1/finetune/operations/{op_id}/events?limit=100").json()["data"]]


@pytest.mark.parametrize("kind", ["extract", "merge", "sparsify"])
def test_async_operation_runs_as_a_job_with_events_log_and_result(client, trained, kind):
    op = submit_async(client, kind, trained, f"async-{kind}")
    done = wait_op(client, op["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert Path(done["result"]["path"]).is_dir()
    if kind != "sparsify":
        assert done["fine_tuning_job_id"] == trained["job_id"]
    events = messages(client, op["id"])
    name = {"extract": "Extract", "merge": "Merge", "sparsify": "Sparsify"}[kind]
    assert f"{name} operation started" in events and f"{name} operation done" in events
    log = client.get(f"/v1/finetune/operations/{op['id']}/log")
    assert log.status_code == 200 and "job process started" in log.text
    listed = client.get(f"/v1/finetune/operations?kind={kind}&limit=100").json()["data"]
    assert op["id"] in [o["id"] for o in listed] and all(o["kind"] == kind for o in listed)
    # Operations are not fine-tuning jobs, and vice versa.
    assert client.get(f"/v1/fine_tuning/jobs/{op['id']}").status_code == 404
    assert client.get(f"/v1/finetune/operations/{trained['job_id']}").status_code == 404
    assert op["id"] not in [j["id"] for j in client.get("/v1/fine_tuning/jobs?limit=100").json()["data"]]


def test_prefer_respond_async_header_answers_202(client, trained):
    route, body = operation_request("extract", trained, "prefer")
    resp = client.post(
        route, content=json.dumps(body), headers={"Prefer": "respond-async", "Content-Type": "application/json"}
    )
    assert resp.status_code == 202 and resp.json()["kind"] == "extract"
    assert wait_op(client, resp.json()["id"], ("succeeded", "failed"))["status"] == "succeeded"


@pytest.mark.parametrize("kind", ["extract", "merge", "sparsify"])
def test_queued_operation_waits_for_a_slot_and_can_be_cancelled(client, trained, kind):
    blocker = start_blocker(client, trained)
    try:
        op = submit_async(client, kind, trained, f"queued-{kind}")
        assert client.get(f"/v1/finetune/operations/{op['id']}").json()["status"] == "queued"  # one slot, taken
        cancelled = client.post(f"/v1/finetune/operations/{op['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert any("cancelled before it started" in m for m in messages(client, op["id"]))
        again = client.post(f"/v1/finetune/operations/{op['id']}/cancel")
        assert again.status_code == 400 and again.json()["error"]["code"] == "operation_not_cancellable"
    finally:
        client.post(f"/v1/fine_tuning/jobs/{blocker}/cancel")
        wait_status(client, blocker, ("cancelled", "failed", "succeeded"))


@pytest.mark.parametrize("kind", ["extract", "merge", "sparsify"])
def test_running_operation_is_cancelled(client, trained, kind):
    op = submit_async(client, kind, trained, f"running-{kind}")
    wait_op(client, op["id"], ("running",))
    resp = client.post(f"/v1/finetune/operations/{op['id']}/cancel")
    assert resp.status_code == 200
    done = wait_op(client, op["id"], ("cancelled", "succeeded", "failed"), timeout=60)
    assert done["status"] == "cancelled"
    assert "Cancellation requested: stopping the job process" in messages(client, op["id"])


@pytest.mark.parametrize("kind", ["extract", "merge", "sparsify"])
def test_operations_survive_a_service_restart(trained, kind):
    """A queued operation stays queued across a restart; a running one is queued again and completes."""
    settings = make_settings(trained["data_dir"])
    with TestClient(create_app(settings)) as first:
        running = submit_async(first, kind, trained, f"restart-running-{kind}")
        wait_op(first, running["id"], ("running",))
        queued = submit_async(first, kind, trained, f"restart-queued-{kind}")
    # The service stopped: the running operation's process was killed, it went back to the queue.
    with TestClient(create_app(settings)) as second:
        for op in (running, queued):
            done = wait_op(second, op["id"], ("succeeded", "failed", "cancelled"))
            assert done["status"] == "succeeded", done["error"]
            assert Path(done["result"]["path"]).is_dir()
        expected = "Interrupted: the service was shut down; queued again, it will run again"
        assert expected in messages(second, running["id"])


def test_waiting_request_gets_a_user_error_as_400_and_the_operation_records_it(client, trained):
    body = {"fine_tuning_job_id": trained["job_id"], "sub_adapter_version": "custom", "custom_config": [99] * 6}
    resp = client.post("/v1/finetune/extract_adapter", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "custom_config"
    failed = client.get("/v1/finetune/operations?kind=extract&limit=1").json()["data"][0]
    assert failed["status"] == "failed" and failed["error"]["param"] == "custom_config"


def test_unknown_operation_is_404(client):
    for method, path in [
        ("get", "/v1/finetune/operations/op-nope"),
        ("post", "/v1/finetune/operations/op-nope/cancel"),
    ]:
        resp = getattr(client, method)(path)
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "operation_id"
