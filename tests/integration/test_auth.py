"""API keys, per-key ownership and JSON-only bodies: the real app, real SQLite, real job processes on a
tiny model, and the real ``sqft serve`` process where the test is about it (start-up refusal, the SDK)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from sqft_service.api.auth import ApiKeys
from sqft_service.app import create_app
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import PYTEST_TMP_ROOT, make_settings, wait_status
from tests.server import Server, free_port, serve_env

KEYS = "alice:key-alice,bob:key-bob"
FAST = {"Training": {"max_train_steps": 2, "batch_size": 4, "learning_rate": 1e-3}}
# Thousands of tiny steps: the job stays active until the test cancels it.
SLOW = {"Training": {"epochs": 1000, "batch_size": 1, "learning_rate": 1e-3, "logging_steps": 1000}}


class Caller:
    """One TestClient (one app, one lifespan) used with one key."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.key = client, key

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self.key}"}
        return self.client.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def upload(self, path: Path, filename: str | None = None) -> dict:
        with open(path, "rb") as handle:
            resp = self.post(
                "/v1/files", files={"file": (filename or path.name, handle)}, data={"purpose": "fine-tune"}
            )
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture
def keyed(data_dir) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(data_dir, api_key=KEYS))) as c:
        yield c


def ids(resp: httpx.Response) -> set[str]:
    assert resp.status_code == 200, resp.text
    return {o["id"] for o in resp.json()["data"]}


def assert_404(resp: httpx.Response) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------------- keys setting
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", {}),
        ("k1", {"k1": "default"}),
        # Bare keys share the project "default": adding a second key is how a key is rotated.
        (" k1 , k2 ,", {"k1": "default", "k2": "default"}),
        ("alice:k1,bob:k2,alice:k3", {"k1": "alice", "k2": "bob", "k3": "alice"}),
        ("team:sk:with:colons", {"sk:with:colons": "team"}),
    ],
)
def test_api_key_setting_parses_keys_and_projects(raw, expected):
    keys = ApiKeys.parse(raw)
    assert bool(keys) is bool(expected) and len(keys) == len(expected)
    for key, project in expected.items():
        assert keys.project_of(key.encode()) == project
        assert keys.project_of(key[:-1].encode()) is None  # a prefix is not the key
    assert keys.project_of(b"not-a-key") is None


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (",", "holds no key"),
        ("alice:", "entry 1"),
        ("k1,bad name:secret-1", "entry 2"),
        ("k1,has space", "entry 2"),
        ("alice:secret-1,bob:secret-1", "second project"),
    ],
)
def test_bad_api_key_setting_is_refused_without_echoing_the_key(raw, needle):
    with pytest.raises(ValueError) as info:
        ApiKeys.parse(raw)
    assert needle in str(info.value) and "SQFT_API_KEY" in str(info.value)
    assert "secret-1" not in str(info.value)


# --------------------------------------------------------------------------------- authentication
PROTECTED = [
    ("GET", "/v1/files", None),
    ("GET", "/v1/files/file-x/content", None),
    ("DELETE", "/v1/files/file-x", None),
    ("GET", "/v1/fine_tuning/jobs", None),
    ("POST", "/v1/fine_tuning/jobs", {"model": "m", "training_file": "t"}),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/events", None),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", None),
    ("POST", "/v1/fine_tuning/jobs/retrieve", {"fine_tuning_job_id": "ftjob-x"}),
    ("POST", "/v1/fine_tuning/jobs/cancel", {"fine_tuning_job_id": "ftjob-x"}),
    ("POST", "/v1/finetune/list_checkpoints", {"fine_tuning_job_id": "ftjob-x"}),
    ("POST", "/v1/finetune/extract_adapter", {"fine_tuning_job_id": "ftjob-x"}),
    ("POST", "/v1/finetune/merge_adapter", {"fine_tuning_job_id": "ftjob-x"}),
    ("POST", "/v1/finetune/sparsify", {"model": "m"}),
    ("GET", "/v1/finetune/operations", None),
    ("GET", "/v1/finetune/operations/op-x/log", None),
    ("GET", "/v1/no-such-route", None),
]


def test_every_route_but_health_and_docs_needs_a_key(keyed):
    for method, route, body in PROTECTED:
        kwargs = {"json": body} if body is not None else {}
        for auth, message in [
            (None, "You didn't provide an API key"),
            ("Bearer key-wrong", "Incorrect API key provided"),
            ("Bearer key-alic", "Incorrect API key provided"),
            ("Basic a2V5LWFsaWNlOg==", "You didn't provide an API key"),  # not the bearer scheme
        ]:
            headers = {"Authorization": auth} if auth else {}
            resp = keyed.request(method, route, headers=headers, **kwargs)
            assert resp.status_code == 401, (method, route, auth, resp.text)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert resp.json() == {
                "error": {
                    "message": resp.json()["error"]["message"],
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            assert resp.json()["error"]["message"].startswith(message)
            assert "key-wrong" not in resp.text  # the offered key is never echoed
    # The right key gets through to the route (its own answer, not a 401).
    assert Caller(keyed, "key-alice").get("/v1/fine_tuning/jobs/ftjob-x/events").status_code == 404
    assert Caller(keyed, "key-bob").get("/v1/files").status_code == 200
    assert keyed.get("/health").json()["status"] == "ok"
    assert keyed.get("/docs").status_code == 200
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert schema["paths"]["/v1/files"]["get"]["security"] == [{"apiKey": []}]
    assert schema["paths"]["/v1/finetune/operations"]["get"]["security"] == [{"apiKey": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_an_upload_without_a_key_is_refused_before_it_is_stored(keyed, data_dir, tmp_path):
    path = write_json(tmp_path / "train.json", alpaca_records(8))
    with open(path, "rb") as handle:
        resp = keyed.post("/v1/files", files={"file": ("train.json", handle)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 401
    assert list((data_dir / "files").iterdir()) == []  # nothing staged, nothing stored
    assert Caller(keyed, "key-alice").get("/v1/files").json()["data"] == []


# ------------------------------------------------------------------------------------- ownership
def test_files_belong_to_the_key_that_uploaded_them(keyed, tmp_path, tiny_model_dir):
    alice, bob = Caller(keyed, "key-alice"), Caller(keyed, "key-bob")
    path = write_json(tmp_path / "train.json", alpaca_records(16))
    mine = alice.upload(path)
    # Another project's file is a 404, as if it did not exist.
    assert_404(bob.get(f"/v1/files/{mine['id']}"))
    assert_404(bob.get(f"/v1/files/{mine['id']}/content"))
    assert_404(bob.delete(f"/v1/files/{mine['id']}"))
    assert ids(bob.get("/v1/files")) == set()
    # Neither by id nor by filename can bob train on alice's file.
    for ref in (mine["id"], "train.json"):
        resp = bob.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": ref})
        assert_404(resp)
        assert resp.json()["error"]["param"] == "training_file"
    assert ids(alice.get("/v1/fine_tuning/jobs")) == set() and ids(bob.get("/v1/fine_tuning/jobs")) == set()

    theirs = bob.upload(path)  # the same filename, uploaded later
    assert ids(alice.get("/v1/files")) == {mine["id"]} and ids(bob.get("/v1/files")) == {theirs["id"]}
    assert alice.get(f"/v1/files/{mine['id']}/content").content == path.read_bytes()
    # "train.json" resolves among the caller's own files only, although bob's is the newest.
    job = alice.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": "train.json"})
    assert job.status_code == 200, job.text
    assert job.json()["training_file"] == mine["id"]
    job_url = f"/v1/fine_tuning/jobs/{job.json()['id']}"
    assert alice.post(f"{job_url}/cancel").status_code == 200
    # A file can be deleted once no active job reads it.
    wait_until(lambda: alice.get(job_url).json()["status"] == "cancelled", 60, what="the cancel")
    assert alice.delete(f"/v1/files/{mine['id']}").status_code == 200
    assert bob.get(f"/v1/files/{theirs['id']}").status_code == 200  # untouched by alice's delete


def test_jobs_and_operations_belong_to_the_key_that_created_them(keyed, tmp_path, tiny_model_dir):
    alice, bob = Caller(keyed, "key-alice"), Caller(keyed, "key-bob")
    f = alice.upload(write_json(tmp_path / "train.json", alpaca_records(16)))
    resp = alice.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": f["id"], **FAST})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]
    ref = {"fine_tuning_job_id": job_id}
    # While the job is queued or running, every route bob could reach it by is a 404.
    for resp in (
        bob.get(f"/v1/fine_tuning/jobs/{job_id}"),
        bob.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        bob.get(f"/v1/fine_tuning/jobs/{job_id}/events"),
        bob.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        bob.get(f"/v1/fine_tuning/jobs/{job_id}/log"),
        bob.post("/v1/fine_tuning/jobs/retrieve", json=ref),
        bob.post("/v1/fine_tuning/jobs/cancel", json=ref),
        bob.post("/v1/finetune/list_checkpoints", json=ref),
    ):
        assert_404(resp)
    assert ids(bob.get("/v1/fine_tuning/jobs")) == set()
    assert ids(alice.get("/v1/fine_tuning/jobs")) == {job_id}

    # Bob's cancels did nothing: the job runs to the end.
    done = wait_until(
        lambda: (j := alice.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
        180,
        what="alice's job to finish",
    )
    assert done["status"] == "succeeded", done["error"]
    # The metrics file the service registered for the job belongs to alice too.
    (metrics_id,) = done["result_files"]
    assert alice.get(f"/v1/files/{metrics_id}/content").status_code == 200
    assert_404(bob.get(f"/v1/files/{metrics_id}/content"))
    assert metrics_id in ids(alice.get("/v1/files")) and metrics_id not in ids(bob.get("/v1/files"))

    # Operations on alice's job: bob cannot start one, nor see alice's.
    assert_404(bob.post("/v1/finetune/merge_adapter", json={**ref, "wait": False}))
    assert_404(bob.post("/v1/finetune/extract_adapter", json={**ref, "sub_adapter_version": "v", "wait": False}))
    # The reference's waiting answer: the wait polls the operation as alice, from the request's task.
    merged = alice.post("/v1/finetune/merge_adapter", json=ref)
    assert merged.status_code == 200 and merged.json()["object"] == "fine_tuning.merged_model", merged.text
    (op_id,) = ids(alice.get("/v1/finetune/operations"))
    for resp in (
        bob.get(f"/v1/finetune/operations/{op_id}"),
        bob.post(f"/v1/finetune/operations/{op_id}/cancel"),
        bob.get(f"/v1/finetune/operations/{op_id}/events"),
        bob.get(f"/v1/finetune/operations/{op_id}/log"),
    ):
        assert_404(resp)
    assert ids(bob.get("/v1/finetune/operations")) == set()
    assert ids(alice.get("/v1/finetune/operations")) == {op_id}
    assert alice.get(f"/v1/finetune/operations/{op_id}").json()["status"] == "succeeded"
    assert alice.post(f"/v1/finetune/operations/{op_id}/cancel").json()["error"]["code"] == "operation_not_cancellable"


def test_rows_created_without_keys_are_hidden_once_keys_are_set(data_dir, tmp_path):
    path = write_json(tmp_path / "train.json", alpaca_records(8))
    with TestClient(create_app(make_settings(data_dir))) as open_client:
        before = Caller(open_client, "ignored").upload(path)  # no keys: the header is not checked
    with TestClient(create_app(make_settings(data_dir, api_key=KEYS))) as c:
        alice = Caller(c, "key-alice")
        assert_404(alice.get(f"/v1/files/{before['id']}"))
        assert ids(alice.get("/v1/files")) == set()
        after = alice.upload(path)
    # Without keys the service is single-tenant again: everything is visible, whoever created it.
    with TestClient(create_app(make_settings(data_dir))) as open_client:
        assert {o["id"] for o in open_client.get("/v1/files").json()["data"]} == {before["id"], after["id"]}


# ------------------------------------------------------------------------------- JSON-only bodies
def test_json_routes_refuse_other_content_types_and_leave_the_job_alone(client, tmp_path, tiny_model_dir):
    f = client.post(
        "/v1/files",
        files={"file": ("t.json", write_json(tmp_path / "t.json", alpaca_records(16)).read_bytes())},
        data={"purpose": "fine-tune"},
    ).json()
    job = client.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": f["id"], **SLOW})
    job_id = job.json()["id"]
    wait_status(client, job_id, ("running",))
    raw = '{"fine_tuning_job_id": "' + job_id + '"}'
    # What a web page can send cross-origin without a CORS preflight: text/plain, or no declared type.
    for route in ("/v1/fine_tuning/jobs/cancel", "/v1/finetune/extract_adapter", "/v1/finetune/merge_adapter"):
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
            resp = client.post(route, content=raw, headers=headers)
            assert resp.status_code == 415, (route, headers, resp.text)
            err = resp.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_media_type"
            assert "application/json" in err["message"]
    body = {"model": str(tiny_model_dir), "training_file": f["id"]}
    plain = {"Content-Type": "text/plain"}
    assert client.post("/v1/fine_tuning/jobs", content=str(body), headers=plain).status_code == 415
    assert client.post("/v1/finetune/sparsify", data={"model": str(tiny_model_dir)}).status_code == 415
    # Untouched: still running, no cancel asked for, no other job or operation created.
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert not any("cancel" in e["message"].lower() for e in events)
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [job_id]
    assert client.get("/v1/finetune/operations").json()["data"] == []
    # The reference README's curl (JSON declared, id unquoted) still works; so does a charset parameter.
    curl_body = '{"fine_tuning_job_id": ' + job_id + "}"
    headers = {"Content-Type": "application/json"}
    assert client.post("/v1/fine_tuning/jobs/retrieve", content=curl_body, headers=headers).status_code == 200
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/v1/fine_tuning/jobs/cancel", content=curl_body, headers=headers).status_code == 200
    assert wait_status(client, job_id, ("cancelled", "failed", "succeeded"), timeout=60)["status"] == "cancelled"
    # A POST without a body needs no Content-Type (curl -X POST .../cancel).
    second = client.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": f["id"]})
    resp = client.post(f"/v1/fine_tuning/jobs/{second.json()['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert wait_status(client, second.json()["id"], ("cancelled", "failed", "succeeded"))["status"] == "cancelled"


# ---------------------------------------------------------------------------- the real server
def _settings(**extra: str) -> dict[str, str]:
    """The server's settings; the calling shell's SQFT_* variables are dropped (``clean_env``), since
    these tests are about the key settings. Read when called: the model root is known once the session is."""
    roots = os.pathsep.join(str(p) for p in PYTEST_TMP_ROOT)
    return {"SQFT_MODEL_ROOTS": roots, "SQFT_THREADS_PER_JOB": "1", "SQFT_POLL_INTERVAL_S": "0.1", **extra}


def _started(tmp_path: Path, **env: str) -> Server:
    server = Server(tmp_path / "data", clean_env=True, **_settings(**env))
    server.start()
    return server


def test_openai_sdk_sends_its_api_key(tmp_path, tiny_model_dir):
    import openai

    server = _started(tmp_path, SQFT_API_KEY="alice:key-alice")
    try:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-alice", max_retries=0)
        path = write_json(tmp_path / "train.json", alpaca_records(16))
        with open(path, "rb") as handle:
            uploaded = sdk.files.create(file=handle, purpose="fine-tune")
        assert [f.id for f in sdk.files.list()] == [uploaded.id]
        job = sdk.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id, extra_body=SLOW)
        assert sdk.fine_tuning.jobs.retrieve(job.id).training_file == uploaded.id
        sdk.fine_tuning.jobs.cancel(job.id)
        wait_until(lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "cancelled", 60, what="the cancel")
        assert any("Created fine-tuning job" in e.message for e in sdk.fine_tuning.jobs.list_events(job.id))

        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.files.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert "Incorrect API key provided" in info.value.message
    finally:
        log = server.stop()
    assert "API keys: 1, projects: alice" in log and "key-alice" not in log


def test_serve_without_a_key_warns_on_loopback(tmp_path):
    server = _started(tmp_path)
    log = server.stop()
    assert "no SQFT_API_KEY: the API is unauthenticated" in log


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--host", "0.0.0.0"], {}, "set SQFT_API_KEY to listen on 0.0.0.0"),
        (["--host", "::"], {}, "set SQFT_API_KEY to listen on ::"),
        (["--host", "127.0.0.1"], {"SQFT_API_KEY": " , "}, "SQFT_API_KEY is set but holds no key"),
    ],
)
def test_serve_refuses_to_start_unprotected(tmp_path, args, env, needle):
    data_dir = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "sqft_service.cli", "serve", *args, "--port", str(free_port())],
        env=serve_env(data_dir, clean_env=True, **_settings(**env)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr
    assert not data_dir.exists()  # it stopped before creating anything
