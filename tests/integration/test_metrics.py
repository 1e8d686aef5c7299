"""GET /metrics: scraped with Prometheus's own parser while real jobs run, after they end, and after a restart.

The real app, SQLite and job processes on the tiny Llama. One job trains for 1000 epochs (it runs until
cancelled, so the scrape cannot miss it), two more wait in the queue behind it: one that succeeds and
one whose model cannot load (failed, `invalid_model`).
"""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sqft_service.app import create_app
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import fine_tune_briefly, make_settings, upload, wait_status
from tests.integration.test_jobs_api import tiny_job

Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient, **headers: str) -> Samples:
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for (sample, key) in samples if sample == name}


def test_metrics_follow_real_jobs_requests_and_uploads(data_dir, tmp_path, tiny_model_dir):
    train = write_json(tmp_path / "t.json", alpaca_records(16))
    (tmp_path / "not-a-model").mkdir()  # under a model root, but nothing loads from it
    with TestClient(create_app(make_settings(data_dir, max_concurrent_jobs=1))) as client:
        f = upload(client, train)
        body = tiny_job(tiny_model_dir, f["id"], Training={"epochs": 1000, "batch_size": 1})
        endless = client.post("/v1/fine_tuning/jobs", json=body).json()
        ok = client.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, f["id"])).json()
        bad = client.post("/v1/fine_tuning/jobs", json=tiny_job(tmp_path / "not-a-model", f["id"])).json()

        def training() -> Samples | None:
            samples = scrape(client)
            rate = value(samples, "sqft_job_tokens_per_second", job_id=endless["id"], kind="fine_tune")
            return samples if rate is not None else None

        running = wait_until(training, 120, interval=0.2, what="a scrape with the running job's throughput")
        assert value(running, "sqft_job_tokens_per_second", job_id=endless["id"], kind="fine_tune") > 0
        assert value(running, "sqft_job_step_seconds", job_id=endless["id"], kind="fine_tune") > 0
        assert value(running, "sqft_job_processes_running") == 1
        assert value(running, "sqft_job_queue_length") == 2
        assert value(running, "sqft_jobs", kind="fine_tune", status="running") == 1
        assert value(running, "sqft_jobs", kind="fine_tune", status="queued") == 2
        assert value(running, "sqft_upload_bytes_total") == train.stat().st_size

        assert client.post(f"/v1/fine_tuning/jobs/{endless['id']}/cancel").status_code == 200
        assert wait_status(client, endless["id"], ("cancelled", "failed", "succeeded"))["status"] == "cancelled"
        assert wait_status(client, ok["id"], ("succeeded", "failed"), timeout=180)["status"] == "succeeded"
        assert wait_status(client, bad["id"], ("succeeded", "failed"))["status"] == "failed"
        assert client.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
        assert client.get("/no/such/route/42").status_code == 404

        done = scrape(client)
        for status in ("succeeded", "failed", "cancelled"):
            assert value(done, "sqft_jobs", kind="fine_tune", status=status) == 1, status
        assert value(done, "sqft_jobs", kind="fine_tune", status="running") == 0  # zeros stay series
        assert value(done, "sqft_jobs", kind="merge", status="failed") == 0
        assert value(done, "sqft_job_failures_total", kind="fine_tune", code="invalid_model") == 1
        assert value(done, "sqft_job_queue_length") == 0 and value(done, "sqft_job_processes_running") == 0
        assert label_values(done, "sqft_job_tokens_per_second", "job_id") == set()  # only running jobs

        requests = "sqft_http_requests_total"
        assert value(done, requests, method="POST", route="/v1/files", status="200") == 1
        assert value(done, requests, method="POST", route="/v1/fine_tuning/jobs", status="200") == 3
        assert value(done, requests, method="POST", route="/v1/fine_tuning/jobs/{job_id}/cancel", status="200") == 1
        assert value(done, requests, method="GET", route="/v1/fine_tuning/jobs/{job_id}", status="200") >= 3
        assert value(done, requests, method="GET", route="/v1/fine_tuning/jobs/{job_id}", status="404") == 1
        assert value(done, requests, method="GET", route="unmatched", status="404") == 1
        # Templates only: no raw path (a job id, the unknown route) ever becomes a label value.
        routes = label_values(done, requests, "route")
        assert not [r for r in routes if "ftjob-" in r or "/no/such" in r], routes
        latency = "sqft_http_request_duration_seconds"
        assert value(done, f"{latency}_count", method="POST", route="/v1/files", status="200") == 1
        assert value(done, f"{latency}_sum", method="POST", route="/v1/files", status="200") > 0
        assert value(done, f"{latency}_bucket", method="POST", route="/v1/files", status="200", le="+Inf") == 1

    # The job numbers come from the store: a new process reports the same; its request counts start at 0.
    with TestClient(create_app(make_settings(data_dir))) as again:
        after = scrape(again)
        for status in ("succeeded", "failed", "cancelled"):
            assert value(after, "sqft_jobs", kind="fine_tune", status=status) == 1, status
        assert value(after, "sqft_job_failures_total", kind="fine_tune", code="invalid_model") == 1
        assert value(after, "sqft_upload_bytes_total") == 0
        assert value(after, "sqft_http_requests_total", method="POST", route="/v1/files", status="200") is None


def test_metrics_need_a_key_when_keys_are_set_and_ready_does_not(data_dir):
    with TestClient(create_app(make_settings(data_dir, api_key="scraper:s3cret-metrics-key"))) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/ready").status_code == 200
        samples = scrape(client, Authorization="Bearer s3cret-metrics-key")
        # The refused scrapes were counted, under the route's template.
        assert value(samples, "sqft_http_requests_total", method="GET", route="/metrics", status="401") == 2
        assert value(samples, "sqft_http_requests_total", method="GET", route="/ready", status="200") == 1


def test_metrics_count_the_engines_tokens_as_the_answers_report_them(data_dir, tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(data_dir, inference_threads=1))) as client:
        before = scrape(client)  # the engine does not exist yet: zeros, and the scrape does not create it
        assert value(before, "sqft_inference_tokens_total", type="generated") == 0
        assert value(before, "sqft_inference_requests_in_flight") == 0
        assert client.app.state.inference_service.created_engine is None
        fine_tune_briefly(client, tiny_model_dir, tmp_path)
        base = {"model": str(tiny_model_dir), "max_tokens": 5, "temperature": 0}
        answers = [
            client.post("/v1/completions", json={**base, "prompt": "The sky is"}).json(),
            client.post(
                "/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "Hi"}], "n": 2}
            ).json(),
        ]
        streamed = client.post("/v1/completions", json={**base, "prompt": "Grass is", "stream": True,
                                                        "stream_options": {"include_usage": True}})  # fmt: skip
        usage = [json.loads(line[6:])["usage"] for line in streamed.text.splitlines() if '"usage": {' in line][-1]
        prompt = sum(a["usage"]["prompt_tokens"] for a in answers) + usage["prompt_tokens"]
        generated = sum(a["usage"]["completion_tokens"] for a in answers) + usage["completion_tokens"]
        after = scrape(client)
        assert value(after, "sqft_inference_tokens_total", type="prompt") == prompt
        assert value(after, "sqft_inference_tokens_total", type="generated") == generated > 0
        # Every slot given back (a stream's once its generation's future is done, just after its last chunk).
        wait_until(lambda: value(scrape(client), "sqft_inference_requests_in_flight") == 0, 10, what="slots back")
