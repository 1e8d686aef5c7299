"""Secrets and limits that hold before the damage (issue 10, items 3 and 4).

Each hostile request is answered with a 4xx in the OpenAI envelope, never a 5xx, and afterwards the
service still answers ``/health`` and what was there before (files, jobs) is intact. The size limits
are also checked against a real HTTP server (uvicorn on a loopback socket): a body that is too big is
refused while the client is still sending it, not after the server has read all of it.
"""

from __future__ import annotations

import json
import select
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.job_secrets import restore_secrets
from sqft_service.store.db import Database
from sqft_service.store.jobs import JobStore
from tests.helpers import alpaca_records, wait_until, write_json, write_jsonl
from tests.integration.conftest import make_settings, upload, wait_status

MiB = 1024 * 1024
TOKEN = "hf_SECRET_do_not_leak_4c1d2e3f"


# ------------------------------------------------------------------ helpers
def assert_intact(client: TestClient, files: list[dict], jobs: tuple[str, ...] = ()) -> None:
    """The service answers, and every earlier file (bytes too) and job is still there."""
    assert client.get("/health").json()["status"] == "ok"
    listed = {f["id"] for f in client.get("/v1/files").json()["data"]}
    for f in files:
        assert f["id"] in listed
        content = client.get(f"/v1/files/{f['id']}/content")
        assert content.status_code == 200 and len(content.content) == f["bytes"]
    for job_id in jobs:
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200


def assert_error(resp, status: int, param: str | None, needle: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert needle in err["message"], err["message"]
    return err


def stored_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "files").iterdir())


@pytest.fixture
def good_file(client, tmp_path) -> dict:
    return upload(client, write_json(tmp_path / "good.json", alpaca_records(4)))


@contextmanager
def live_server(settings) -> Iterator[tuple[str, int]]:
    """The real app behind uvicorn on a loopback port (what `sqft serve` runs), for raw HTTP."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", http="h11", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, what="uvicorn to start")
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _read_response(conn: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length])


def send_until_answered(addr, head: bytes, body: Iterator[bytes]) -> tuple[int, dict, int]:
    """Send ``head`` then ``body`` chunks, stopping as soon as the server answers.

    Returns the status, the JSON answer and how many body bytes had been sent by then.
    """
    with socket.create_connection(addr, timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.sendall(head)
        sent = 0
        for chunk in body:
            view = memoryview(chunk)
            while view:
                readable, writable, _ = select.select([conn], [conn], [], 30)
                if readable:
                    return (*_read_response(conn), sent)
                assert writable, "the server neither reads the body nor answers"
                try:
                    n = conn.send(view)
                except (BrokenPipeError, ConnectionResetError):
                    return (*_read_response(conn), sent)
                view, sent = view[n:], sent + n
        return (*_read_response(conn), sent)


def live_health(addr) -> int:
    with socket.create_connection(addr, timeout=30) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        return _read_response(conn)[0]


def http_chunks(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked transfer encoding: no Content-Length tells the server how big the body is."""
    for block in blocks:
        yield f"{len(block):x}\r\n".encode() + block + b"\r\n"
    yield b"0\r\n\r\n"


def endless_upload(boundary: str, total: int) -> Iterator[bytes]:
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    block = (json.dumps(alpaca_records(1)[0]) + "\n").encode() * 1000
    for _ in range(total // len(block)):
        yield block


# ------------------------------------------------------------------ 1. secrets
def test_token_is_redacted_everywhere_but_reaches_the_job(client, tiny_model_dir, train_file, data_dir):
    # OpenAI's metadata at its limits is accepted and returned whole.
    metadata = {f"k{i:02d}".ljust(64, "x"): "v" * 512 for i in range(16)}
    body = {
        "model": str(tiny_model_dir),
        "training_file": train_file["id"],
        "metadata": metadata,
        "General": {"config": {"token": TOKEN}, "save_strategy": "epoch", "lora_config": {"r": 4}},
        "Training": {"batch_size": 8, "epochs": 1, "logging_steps": 1},
        "Dataset": {"validation_split_percentage": 0},
    }
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["config"]["General"]["config"]["token"] == "***" and job["metadata"] == metadata
    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=240)
    assert done["status"] == "succeeded", done["error"]

    for shown in (
        client.get(f"/v1/fine_tuning/jobs/{job['id']}").text,
        client.get("/v1/fine_tuning/jobs").text,
        client.post("/v1/fine_tuning/jobs/retrieve", json={"fine_tuning_job_id": job["id"]}).text,
        client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).text,
        client.get(f"/v1/fine_tuning/jobs/{job['id']}/log").text,
    ):
        assert TOKEN not in shown
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["config"]["General"]["config"]["token"] == "***"

    # Nowhere in the data dir (database, spec.json, job.log, every training_config.json) but the
    # job's secrets file, which only the service's user may read.
    workspace = data_dir / "jobs" / job["id"]
    secrets_file = workspace / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    written = [p for p in data_dir.rglob("*") if p.is_file() and p != secrets_file]
    configs = [p for p in written if p.name == "training_config.json"]
    assert len(configs) >= 3, configs  # output/, adapter/, checkpoints/step-N/
    assert all(json.loads(p.read_text())["General"]["config"]["token"] == "***" for p in configs)
    leaking = [str(p) for p in written if TOKEN.encode() in p.read_bytes()]
    assert leaking == []
    # What the job process reads: the stored spec holds "***", the secrets file puts the token back.
    params = json.loads((workspace / "spec.json").read_text())["params"]
    assert restore_secrets(params, secrets_file)["General"]["config"]["token"] == TOKEN


def test_a_token_stored_before_redaction_is_not_shown(client, data_dir, tmp_path):
    # A job row written by an older version kept the token in its config; the API must hide it too.
    db = Database(data_dir / "sqft.db")
    config = {"General": {"config": {"token": TOKEN, "trust_remote_code": False}}, "Training": {}}
    JobStore(db).create(
        job_id="ftjob-legacy", kind="fine_tune", config=config, workspace=str(tmp_path / "ws"),
        status="failed", model="m", training_file="file-x", seed=1,
    )  # fmt: skip
    db.close()
    for shown in (client.get("/v1/fine_tuning/jobs/ftjob-legacy"), client.get("/v1/fine_tuning/jobs")):
        assert shown.status_code == 200 and TOKEN not in shown.text
    assert client.get("/v1/fine_tuning/jobs/ftjob-legacy").json()["config"]["General"]["config"]["token"] == "***"


# ------------------------------------------------------------------ 2. uploads
def test_upload_over_the_limit_is_413_and_leaves_nothing(data_dir, tmp_path):
    with TestClient(create_app(make_settings(data_dir, max_upload_bytes=MiB))) as client:
        good = upload(client, write_json(tmp_path / "good.json", alpaca_records(4)))
        big = write_jsonl(tmp_path / "big.jsonl", alpaca_records(30_000))
        assert big.stat().st_size > 2 * MiB
        with open(big, "rb") as handle:
            resp = client.post("/v1/files", files={"file": ("big.jsonl", handle)}, data={"purpose": "fine-tune"})
        assert_error(resp, 413, "file", "limit")
        assert stored_files(data_dir) == [good["id"]]  # no staging file left behind
        assert_intact(client, [good])


def test_upload_setting_in_mib_applies(data_dir, tmp_path):
    settings = make_settings(data_dir, max_upload_mb=1)
    assert settings.upload_limit_bytes == MiB
    with TestClient(create_app(settings)) as client:
        under = upload(client, write_jsonl(tmp_path / "under.jsonl", alpaca_records(2_000)))
        assert under["bytes"] < MiB
        resp = client.post("/v1/files", files={"file": ("over.bin", b"x" * (MiB + 1))}, data={"purpose": "batch"})
        assert_error(resp, 413, "file")
        assert stored_files(data_dir) == [under["id"]]


def test_upload_never_touches_the_system_temp_dir(data_dir, tmp_path, monkeypatch):
    # Starlette spools form files over 1 MB to the temp dir; with it pointing nowhere, any such spool
    # fails. The upload must go straight to the data dir instead.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp-dir"))
    with TestClient(create_app(make_settings(data_dir, max_upload_bytes=8 * MiB))) as client:
        path = write_jsonl(tmp_path / "three-mib.jsonl", alpaca_records(40_000))
        assert path.stat().st_size > 2 * MiB
        obj = upload(client, path)
        assert obj["bytes"] == path.stat().st_size and obj["n_records"] == 40_000
        assert client.get(f"/v1/files/{obj['id']}/content").content == path.read_bytes()
    assert not (tmp_path / "no-such-temp-dir").exists()


def test_live_upload_with_too_big_content_length_is_refused_before_the_body(data_dir, tmp_path):
    with live_server(make_settings(data_dir, max_upload_bytes=MiB)) as addr:
        head = (
            b"POST /v1/files HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n" + f"Content-Length: {600 * MiB}\r\n\r\n".encode()
        )
        # Not one byte of the 600 MiB is sent: the answer must come from the headers alone.
        status, answer, sent = send_until_answered(addr, head, iter(()))
        assert status == 413 and answer["error"]["param"] == "file" and sent == 0
        assert live_health(addr) == 200
    assert stored_files(data_dir) == []


def test_live_chunked_upload_is_cut_off_at_the_limit(data_dir, tmp_path):
    total = 256 * MiB
    with live_server(make_settings(data_dir, max_upload_bytes=MiB)) as addr:
        head = (
            b"POST /v1/files HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        status, answer, sent = send_until_answered(addr, head, http_chunks(endless_upload("B", total)))
        assert status == 413 and answer["error"]["param"] == "file", answer
        # Answered while the client was still sending: the server stopped reading near the limit
        # (the rest of what was sent sits in socket buffers).
        assert sent < total // 4, sent
        assert live_health(addr) == 200
    assert stored_files(data_dir) == []


RECORD = (json.dumps(alpaca_records(1)[0]) + "\n").encode()


def _part(name: str, data: bytes, filename: str | None = "t.jsonl") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--B\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


BAD_FORMS = [
    ("cut short", _part("file", RECORD)[:-2], "closing multipart boundary"),
    ("two files", _part("file", RECORD) + _part("file", RECORD) + b"--B--\r\n", "several"),
    ("huge field", _part("file", RECORD) + _part("purpose", b"x" * 100_000, None) + b"--B--\r\n", "purpose"),
    ("no file", _part("purpose", b"fine-tune", None) + b"--B--\r\n", "Missing required parameter `file`"),
    ("not multipart", b"garbage without any boundary", "not valid multipart"),
    ("nameless part", b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n", "no name"),
]


@pytest.mark.parametrize(("name", "body", "needle"), BAD_FORMS, ids=[f[0] for f in BAD_FORMS])
def test_malformed_multipart_is_400(client, good_file, data_dir, name, body, needle):
    resp = client.post("/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]
    assert stored_files(data_dir) == [good_file["id"]]
    assert_intact(client, [good_file])


def test_upload_that_is_not_a_form_is_400(client, good_file):
    resp = client.post("/v1/files", json={"file": "x"})
    assert_error(resp, 400, "file", "multipart/form-data")
    assert_intact(client, [good_file])


# ------------------------------------------------------------------ 3. JSON bodies and metadata
def test_json_body_over_the_limit_is_413(data_dir, tmp_path):
    with TestClient(create_app(make_settings(data_dir))) as client:
        good = upload(client, write_json(tmp_path / "good.json", alpaca_records(4)))
        huge = {"training_file": good["id"], "metadata": {"k": "v" * (2 * MiB)}}
        for route in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/retrieve", "/v1/finetune/extract_adapter"):
            assert_error(client.post(route, json=huge), 413, None, "limit")
        # Just under the limit the body reaches the route (which wants a model).
        padded = json.dumps({"training_file": "file-nope"}) + " " * (MiB - 100)
        resp = client.post("/v1/fine_tuning/jobs", content=padded, headers={"content-type": "application/json"})
        assert_error(resp, 400, "model")
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert_intact(client, [good])


def test_max_json_bytes_is_a_setting(data_dir):
    with TestClient(create_app(make_settings(data_dir, max_json_bytes=1000))) as client:
        body = {"fine_tuning_job_id": "x" * 2000}
        assert_error(client.post("/v1/fine_tuning/jobs/retrieve", json=body), 413, None, "1000 bytes")
        assert_error(client.post("/v1/fine_tuning/jobs/retrieve", json={"fine_tuning_job_id": "x"}), 404,
                     "fine_tuning_job_id")  # fmt: skip


def test_live_chunked_json_body_is_cut_off_at_the_limit(data_dir):
    total = 256 * MiB
    with live_server(make_settings(data_dir)) as addr:
        head = (
            b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        blocks = iter([b'{"training_file": "', *([b"a" * 65536] * (total // 65536))])
        status, answer, sent = send_until_answered(addr, head, http_chunks(blocks))
        assert status == 413 and answer["error"]["code"] == "request_too_large", answer
        assert sent < total // 4, sent
        head = (
            b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: application/json\r\nContent-Length: {100 * MiB}\r\n\r\n".encode()
        )
        status, _, sent = send_until_answered(addr, head, iter(()))
        assert status == 413 and sent == 0
        assert live_health(addr) == 200


METADATA_CASES = [
    ("17 keys", {f"k{i}": "v" for i in range(17)}, "at most 16"),
    ("long key", {"k" * 65: "v"}, "keys are at most 64"),
    ("long value", {"k": "v" * 513}, "values are at most 512"),
    ("number value", {"k": 5}, "must be a string"),
    ("object value", {"k": {"nested": "x"}}, "must be a string"),
    ("not an object", ["k", "v"], "must be an object"),
]


@pytest.mark.parametrize(("name", "metadata", "needle"), METADATA_CASES, ids=[c[0] for c in METADATA_CASES])
def test_metadata_follows_openai_limits(client, good_file, name, metadata, needle):
    resp = client.post("/v1/fine_tuning/jobs", json={"training_file": good_file["id"], "metadata": metadata})
    assert_error(resp, 400, "metadata", needle)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert_intact(client, [good_file])


# ------------------------------------------------------------------ 4. deep nesting
DEEP = "[" * 100_000


@pytest.mark.parametrize(
    ("filename", "payload", "line"),
    [
        ("deep.json", DEEP.encode(), 1),
        ("deep-record.json", ("[\n" + json.dumps(alpaca_records(1)[0]) + ",\n" + DEEP).encode(), 3),
        ("deep.jsonl", (json.dumps(alpaca_records(1)[0]) + "\n" + DEEP + "\n").encode(), 2),
    ],
)
def test_deeply_nested_upload_is_400_naming_the_line(client, good_file, data_dir, filename, payload, line):
    resp = client.post("/v1/files", files={"file": (filename, payload)}, data={"purpose": "fine-tune"})
    assert_error(resp, 400, "file", f"line {line}: invalid JSON (nested too deeply)")
    assert stored_files(data_dir) == [good_file["id"]]
    assert_intact(client, [good_file])


@pytest.mark.parametrize(
    "route",
    [
        "/v1/fine_tuning/jobs",  # parsed by FastAPI
        "/v1/finetune/sparsify",  # parsed by FastAPI
        "/v1/fine_tuning/jobs/retrieve",  # parsed leniently (api/body.py)
        "/v1/fine_tuning/jobs/cancel",
        "/v1/finetune/extract_adapter",
        "/v1/finetune/merge_adapter",
    ],
)
@pytest.mark.parametrize("body", [DEEP, '{"a":' * 100_000], ids=["arrays", "objects"])
def test_deeply_nested_json_body_is_400(client, good_file, route, body):
    resp = client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert_error(resp, 400, None)
    assert_intact(client, [good_file])


# ------------------------------------------------------------------ 5. numeric ranges
NUMERIC_CASES = [
    ("seed 1e20", {"Training": {"seed": 1e20}}, "Training.seed"),
    ("seed 2**63", {"Training": {"seed": 2**63}}, "Training.seed"),
    ("negative seed", {"Training": {"seed": -5}}, "Training.seed"),
    ("top-level seed", {"seed": 2**31}, "seed"),
    ("weight_decay Infinity", '{"Training": {"weight_decay": Infinity}}', "Training.weight_decay"),
    ("learning_rate NaN", '{"Training": {"learning_rate": NaN}}', "Training.learning_rate"),
    (
        "lora_alpha -Infinity",
        '{"General": {"lora_config": {"lora_alpha": -Infinity}}}',
        "General.lora_config.lora_alpha",
    ),
    (
        "multiplier Infinity",
        '{"hyperparameters": {"learning_rate_multiplier": Infinity}}',
        "hyperparameters.learning_rate_multiplier",
    ),
    (
        "multiplier 1e308",
        {"hyperparameters": {"learning_rate_multiplier": 1e308}},
        "hyperparameters.learning_rate_multiplier",
    ),
    ("n_epochs 1e20", {"hyperparameters": {"n_epochs": 1e20}}, "hyperparameters.n_epochs"),
    ("batch_size 10**6", {"hyperparameters": {"batch_size": 10**6}}, "hyperparameters.batch_size"),
    ("epochs 10**9", {"Training": {"epochs": 10**9}}, "Training.epochs"),
    ("max_train_steps 2**70", {"Training": {"max_train_steps": 2**70}}, "Training.max_train_steps"),
    ("warmup_steps 10**12", {"Training": {"warmup_steps": 10**12}}, "Training.warmup_steps"),
    ("save_steps 10**12", {"General": {"save_steps": 10**12}}, "General.save_steps"),
    ("max_length 10**12", {"Dataset": {"max_length": 10**12}}, "Dataset.max_length"),
    (
        "gradient_accumulation 10**9",
        {"Training": {"gradient_accumulation_steps": 10**9}},
        "Training.gradient_accumulation_steps",
    ),
    ("max_train_samples 2**64", {"Dataset": {"max_train_samples": 2**64}}, "Dataset.max_train_samples"),
    ("weight_decay 50", {"Training": {"weight_decay": 50}}, "Training.weight_decay"),
]


@pytest.mark.parametrize(("name", "extra", "param"), NUMERIC_CASES, ids=[c[0] for c in NUMERIC_CASES])
def test_numbers_out_of_range_are_400_naming_the_field(client, tiny_model_dir, good_file, name, extra, param):
    base = {"model": str(tiny_model_dir), "training_file": good_file["id"]}
    # A string holds JSON's non-finite literals, which Python's json (and so FastAPI) accepts.
    content = json.dumps(base)[:-1] + ", " + extra[1:] if isinstance(extra, str) else json.dumps({**base, **extra})
    resp = client.post("/v1/fine_tuning/jobs", content=content, headers={"content-type": "application/json"})
    assert_error(resp, 400, param)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert_intact(client, [good_file])


def test_multiplier_is_checked_against_the_resolved_rate(client, tiny_model_dir, good_file):
    # 1e4 x the default 5e-5 is 0.5 (fine); x Training.learning_rate 1e-3 it is 10 (past 1.0).
    body = {
        "model": str(tiny_model_dir),
        "training_file": good_file["id"],
        "hyperparameters": {"learning_rate_multiplier": 1e4},
        "Training": {"learning_rate": 1e-3},
    }
    err = assert_error(client.post("/v1/fine_tuning/jobs", json=body), 400, "hyperparameters.learning_rate_multiplier")
    assert "Training.learning_rate" in err["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


# ------------------------------------------------------------------ 6. page sizes
PAGES = [
    ("/v1/files", 10_000),
    ("/v1/fine_tuning/jobs", 100),
    ("/v1/fine_tuning/jobs/ftjob-none/events", 1000),
    ("/v1/fine_tuning/jobs/ftjob-none/checkpoints", 100),
    ("/v1/finetune/operations", 100),
    ("/v1/finetune/operations/op-none/events", 1000),
]


@pytest.mark.parametrize(("route", "most"), PAGES, ids=[p[0] for p in PAGES])
def test_list_limit_is_bounded(client, good_file, route, most):
    assert client.get(route, params={"limit": most}).status_code in (200, 404)  # 404: the job does not exist
    for bad in (most + 1, 10**30, 0):
        assert_error(client.get(route, params={"limit": bad}), 400, "limit")
    assert_intact(client, [good_file])


def test_settings_parse_from_the_environment():
    from sqft_service.settings import Settings

    s = Settings.from_env({"SQFT_MAX_UPLOAD_MB": "3", "SQFT_MAX_JSON_BYTES": "2048"})
    assert (s.upload_limit_bytes, s.max_json_bytes) == (3 * MiB, 2048)
    assert Settings.from_env({"SQFT_MAX_UPLOAD_BYTES": "10"}).upload_limit_bytes == 10
    with pytest.raises(SystemExit, match="SQFT_MAX_UPLOAD_MB"):
        Settings.from_env({"SQFT_MAX_UPLOAD_MB": "lots"})


def test_unfinished_jobs_and_stored_files_are_bounded_per_project(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "quota"
    with TestClient(create_app(make_settings(data_dir, max_unfinished_jobs=2, max_files=2))) as client:
        f = upload(client, write_json(tmp_path / "a.json", alpaca_records(16)))
        upload(client, write_json(tmp_path / "b.json", alpaca_records(8)))
        with open(write_json(tmp_path / "c.json", alpaca_records(8)), "rb") as handle:
            third = client.post("/v1/files", files={"file": ("c.json", handle)}, data={"purpose": "fine-tune"})
        assert third.status_code == 429 and third.json()["error"]["code"] == "quota_exceeded"
        assert len(client.get("/v1/files").json()["data"]) == 2
        assert not [p for p in (data_dir / "files").iterdir() if p.name.startswith(".")]  # nothing staged left

        slow = {"epochs": 1000, "batch_size": 1, "learning_rate": 1e-3}
        body = {"model": str(tiny_model_dir), "training_file": f["id"], "Training": slow}
        ids = [client.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(2)]
        refused = client.post("/v1/fine_tuning/jobs", json=body)
        assert refused.status_code == 429 and "SQFT_MAX_UNFINISHED_JOBS" in refused.json()["error"]["message"]
        assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 2  # nothing half-created
        client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel")  # a queued job: cancelled at once
        assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # room again
        for job in client.get("/v1/fine_tuning/jobs").json()["data"]:
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        for job in client.get("/v1/fine_tuning/jobs").json()["data"]:
            wait_status(client, job["id"], ("cancelled", "failed", "succeeded"))
