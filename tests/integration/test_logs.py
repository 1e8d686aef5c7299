"""SQFT_LOG_FORMAT=json and X-Request-ID, on the real server (a subprocess) and its real job processes."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.logs import ContextFilter
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import make_settings
from tests.integration.test_jobs_api import tiny_job
from tests.integration.test_metrics import scrape, value
from tests.server import Server

KEY = "logs-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON log record with the fields each must have (parsing fails otherwise)."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0), line  # ISO 8601, UTC
        records.append(record)
    return records


def test_json_logs_of_the_server_and_its_jobs_carry_request_and_job_ids(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "sqft-data"
    data_dir.mkdir()
    server = Server(
        data_dir,
        SQFT_LOG_FORMAT="json",
        SQFT_API_KEY=KEY,
        SQFT_MODEL_ROOTS=str(tiny_model_dir),
        SQFT_THREADS_PER_JOB="1",
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            ours = http.get("/v1/files", headers={"X-Request-ID": "req-files.42"})
            assert ours.status_code == 200 and ours.headers["x-request-id"] == "req-files.42"
            # Not a sane id (a space, and far too long): replaced, never echoed.
            for insane in ("two words", "x" * 200):
                made = http.get("/health", headers={"X-Request-ID": insane}).headers["x-request-id"]
                assert made != insane and len(made) == 32 and int(made, 16) >= 0
            refused = httpx.get(f"{server.url}/v1/files", headers={"X-Request-ID": "req-no-key"})
            assert refused.status_code == 401 and refused.headers["x-request-id"] == "req-no-key"

            train = write_json(tmp_path / "t.json", alpaca_records(8))
            with open(train, "rb") as handle:
                f = http.post("/v1/files", files={"file": ("t.json", handle)}, data={"purpose": "fine-tune"}).json()
            job = http.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, f["id"])).json()

            def ended() -> dict | None:
                got = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                return got if got["status"] in ("succeeded", "failed", "cancelled") else None

            assert wait_until(ended, 180, what="the job to end")["status"] == "succeeded"
            job_log = json_lines(http.get(f"/v1/fine_tuning/jobs/{job['id']}/log").text)
    finally:
        server.stop()

    assert job_log and all(r["job_id"] == job["id"] for r in job_log)
    assert any(r["message"].startswith("job process started") for r in job_log)
    assert any(r["logger"] == "sqft_service.worker" and "train_loss=" in r["message"] for r in job_log)

    records = json_lines(Path(data_dir.parent / f"server-{server.port}.log").read_text())
    access = {r.get("request_id"): r for r in records if r["logger"] == "uvicorn.access"}
    assert access["req-files.42"]["path"] == "/v1/files" and access["req-files.42"]["status"] == 200
    assert access["req-no-key"]["status"] == 401 and access["req-no-key"]["method"] == "GET"
    assert all(r.get("request_id") for r in records if r["logger"] == "uvicorn.access")
    assert any(r["logger"] == "sqft_service.app" and r["message"].startswith("sqft-service") for r in records)


def test_a_500_carries_the_request_id_in_its_header_log_record_and_metrics(data_dir, caplog):
    app = create_app(make_settings(data_dir))

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)  # a route with a bug, on the real app and its real middlewares
    caplog.handler.addFilter(ContextFilter())  # what the service's own handler has
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        resp = client.get("/broken", headers={"X-Request-ID": "req-500"})
        assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
        assert resp.headers["x-request-id"] == "req-500"
        samples = scrape(client)
    assert value(samples, "sqft_http_requests_total", method="GET", route="/broken", status="500") == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert record.request_id == "req-500" and record.exc_info is not None


@pytest.mark.parametrize("raw", ["yaml", "JSON "])
def test_an_unknown_log_format_stops_the_service_naming_the_variable(raw):
    from sqft_service.settings import Settings

    with pytest.raises(SystemExit, match="SQFT_LOG_FORMAT"):
        Settings.from_env({"SQFT_LOG_FORMAT": raw})
