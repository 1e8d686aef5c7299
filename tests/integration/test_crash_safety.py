"""Crash safety: pause/resume, a killed job process resumes exactly, files in use, uploads checked at start.

The real app, SQLite and job processes on a tiny Llama; every job uses one thread and a fixed seed, so
an interrupted-and-resumed job can be compared bit for bit with one that ran straight through.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from sqft_service.app import create_app
from sqft_service.store.db import Database
from sqft_service.store.jobs import JobStore
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import make_settings, upload, wait_status
from tests.server import Server

# ~200 tiny steps: long enough to interrupt, short enough for a test.
STEADY = {
    "Training": {"epochs": 12, "batch_size": 1, "learning_rate": 1e-3, "seed": 11, "logging_steps": 1},
    "General": {"lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}},
    "Dataset": {"validation_split_percentage": 0},
}


def job_body(model_dir: Path, file_id: str) -> dict:
    return {"model": str(model_dir), "training_file": file_id, **STEADY}


def adapter_tensors(job: dict) -> dict:
    return load_file(str(Path(job["fine_tuned_model_path"]) / "adapter_model.safetensors"))


def messages(client: TestClient, job_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]]


def steps_done(client: TestClient, job_id: str) -> int:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=5").json()["data"]
    return max([e["data"]["step"] for e in events if e["type"] == "metrics" and "step" in (e["data"] or {})] or [0])


def run_straight(client: TestClient, model_dir: Path, file_id: str) -> dict:
    job = client.post("/v1/fine_tuning/jobs", json=job_body(model_dir, file_id)).json()
    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=240)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_paused_job_resumes_and_ends_as_if_never_paused(tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        straight = run_straight(client, tiny_model_dir, f["id"])

        job = client.post("/v1/fine_tuning/jobs", json=job_body(tiny_model_dir, f["id"])).json()
        wait_until(lambda: steps_done(client, job["id"]) >= 5, 120, interval=0.05, what="a few steps")
        paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
        assert paused.status_code == 200
        assert wait_status(client, job["id"], ("paused", "succeeded"))["status"] == "paused"
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").status_code == 400  # not pausable now
        resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] in ("queued", "running")
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done["error"]
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["error"]["code"] == "job_not_paused"

        log = messages(client, job["id"])
        assert "Job paused: resume it to continue from where it stopped" in log
        assert any(m.startswith("resuming from step ") for m in log)
        assert done["trained_tokens"] == straight["trained_tokens"]  # counted once
        a, b = adapter_tensors(straight), adapter_tensors(done)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_killed_job_process_is_relaunched_and_resumes_exactly(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data", checkpoint_interval_s=0.0)  # a resume point after every step
    with TestClient(create_app(settings)) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        straight = run_straight(client, tiny_model_dir, f["id"])

        job = client.post("/v1/fine_tuning/jobs", json=job_body(tiny_model_dir, f["id"])).json()
        wait_until(lambda: steps_done(client, job["id"]) >= 20, 120, interval=0.05, what="some steps")
        db = Database(settings.db_path)
        pid = JobStore(db).get(job["id"]).pid
        db.close()
        os.killpg(pid, signal.SIGKILL)  # the job process dies mid-step, as under the OOM killer
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done["error"]

        log = messages(client, job["id"])
        assert any(m.startswith("Interrupted: the job process died (exit code") for m in log)
        assert "Fine-tuning job started again (launch 2)" in log
        resumed_from = [m for m in log if m.startswith("resuming from step ")]
        # Step 20's metrics event precedes its resume point, so the kill may land between the two.
        assert resumed_from and int(resumed_from[0].split()[3]) >= 19
        assert done["trained_tokens"] == straight["trained_tokens"]
        a, b = adapter_tensors(straight), adapter_tensors(done)
        assert all((a[k] == b[k]).all() for k in a)


def test_a_fine_tune_running_at_shutdown_resumes_after_the_restart(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data")  # default interval: the resume point comes from the SIGTERM
    with TestClient(create_app(settings)) as first:
        f = upload(first, write_json(tmp_path / "t.json", alpaca_records(16)))
        job = first.post("/v1/fine_tuning/jobs", json=job_body(tiny_model_dir, f["id"])).json()
        wait_until(lambda: steps_done(first, job["id"]) >= 5, 120, interval=0.05, what="a few steps")
    with TestClient(create_app(settings)) as second:
        done = wait_status(second, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done["error"]
        log = messages(second, job["id"])
        assert any(m.startswith("Interrupted: the service was shut down; queued again") for m in log)
        resumed_from = [m for m in log if m.startswith("resuming from step ")]
        assert resumed_from and int(resumed_from[0].split()[3]) >= 5


def test_a_file_that_a_job_will_read_cannot_be_deleted(tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        job = client.post("/v1/fine_tuning/jobs", json=job_body(tiny_model_dir, f["id"])).json()
        resp = client.delete(f"/v1/files/{f['id']}")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "file_in_use"
        assert job["id"] in resp.json()["error"]["message"]
        assert client.get(f"/v1/files/{f['id']}").status_code == 200  # still there
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        wait_status(client, job["id"], ("cancelled", "succeeded", "failed"))
        assert client.delete(f"/v1/files/{f['id']}").status_code == 200


def test_a_training_file_changed_on_disk_fails_the_job_at_start(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    with TestClient(create_app(make_settings(data_dir))) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        blob = data_dir / "files" / f["id"]
        blob.write_bytes(blob.read_bytes().replace(b"red", b"rod"))  # bit rot, or a hand edit
        job = client.post("/v1/fine_tuning/jobs", json=job_body(tiny_model_dir, f["id"])).json()
        failed = wait_status(client, job["id"], ("failed", "succeeded"))
        assert failed["status"] == "failed" and failed["error"]["code"] == "input_file_corrupted"
        assert "changed on disk since it was uploaded" in failed["error"]["message"]


class TestKillNineOfTheService:
    """``kill -9`` of the real service process while a job runs (the job process lives on in its own session)."""

    @staticmethod
    def start(data_dir: Path, model_dir: Path, **env: str) -> Server:
        server = Server(data_dir, SQFT_MODEL_ROOTS=str(model_dir.parent), SQFT_THREADS_PER_JOB="1", **env)
        server.start()
        return server

    @staticmethod
    def submit(server: Server, tmp_path: Path, model_dir: Path, epochs: int = 12) -> str:
        with open(write_json(tmp_path / "t.json", alpaca_records(16)), "rb") as handle:
            f = httpx.post(f"{server.url}/v1/files", files={"file": ("t.json", handle)}, data={"purpose": "fine-tune"})
        assert f.status_code == 200, f.text
        body = job_body(model_dir, f.json()["id"])
        body["Training"] = {**body["Training"], "epochs": epochs}
        job = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body)
        assert job.status_code == 200, job.text
        job_id = job.json()["id"]
        wait_until(lambda: steps_done_http(server, job_id) >= 5, 120, interval=0.05, what="a few steps")
        return job_id

    def test_a_job_that_finished_while_the_service_was_down_keeps_its_result(self, tmp_path, tiny_model_dir):
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        first = self.start(data_dir, tiny_model_dir)
        job_id = self.submit(first, tmp_path, tiny_model_dir)
        first.kill()
        outcome = data_dir / "jobs" / job_id / "outcome.json"
        wait_until(outcome.is_file, 240, what="the orphaned job process to finish")
        second = self.start(data_dir, tiny_model_dir)
        try:
            job = httpx.get(f"{second.url}/v1/fine_tuning/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["fine_tuned_model_path"].endswith("/output/adapter")
            merged = httpx.post(
                f"{second.url}/v1/finetune/merge_adapter", json={"fine_tuning_job_id": job_id}, timeout=120
            )
            assert merged.status_code == 200, merged.text  # the adapter is reachable, not lost
        finally:
            second.stop()

    def test_a_job_still_running_at_restart_resumes_from_its_last_resume_point(self, tmp_path, tiny_model_dir):
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        first = self.start(data_dir, tiny_model_dir, SQFT_CHECKPOINT_INTERVAL_S="0.2")
        job_id = self.submit(first, tmp_path, tiny_model_dir, epochs=60)  # ~1000 steps: still running at restart
        first.kill()
        second = self.start(data_dir, tiny_model_dir, SQFT_CHECKPOINT_INTERVAL_S="0.2")
        try:

            def ended():
                job = httpx.get(f"{second.url}/v1/fine_tuning/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_until(ended, 240, what="the job to end after the restart")
            events = httpx.get(f"{second.url}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
            messages = [e["message"] for e in events]
            assert job["status"] == "succeeded", job["error"]
            assert any(m.startswith("Interrupted: the service stopped; queued again") for m in messages)
            assert any(m.startswith("resuming from step ") and " 0 of" not in m for m in messages)
            steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {})]
            assert max(steps) == 60 * 16  # the same number of steps as a job never interrupted
        finally:
            second.stop()


def steps_done_http(server: Server, job_id: str) -> int:
    events = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events?limit=5").json()["data"]
    return max([e["data"]["step"] for e in events if e["type"] == "metrics" and "step" in (e["data"] or {})] or [0])
