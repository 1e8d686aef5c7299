"""Fine-tunes with ``Training.num_training_workers = 2`` through the subprocess runner (jobs/local_ranks.py).

The real service, the real job process (rank 0) and its child rank, gloo on loopback, a tiny Llama.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.store.db import Database
from sqft_service.store.jobs import JobStore
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import make_settings, upload, wait_status
from tests.integration.test_metrics import scrape, value
from tests.server import Server

TWO_WORKERS = {
    "Training": {
        "num_training_workers": 2,
        "resources_per_worker": {"CPU": 1},
        "batch_size": 1,
        "learning_rate": 1e-3,
        "seed": 5,
        "logging_steps": 1,
        "device": "cpu",
        "mixed_precision": "no",
    },
    "General": {"lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}},
    "Dataset": {"validation_split_percentage": 0},
}


def two_worker_job(model_dir: Path, file_id: str, epochs: int) -> dict:
    body = {"model": str(model_dir), "training_file": file_id, **TWO_WORKERS}
    body["Training"] = {**TWO_WORKERS["Training"], "epochs": epochs}
    return body


def events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]


def steps_done(client, job_id: str) -> int:
    rows = [e["data"] for e in events(client, job_id) if e["type"] == "metrics"]
    return max([d["step"] for d in rows if "step" in d] or [0])


def job_ranks(settings_db: Path, job_id: str) -> list[psutil.Process]:
    """Rank 0 (the job process the manager started) and the ranks it started."""
    db = Database(settings_db)
    pid = JobStore(db).get(job_id).pid
    db.close()
    rank0 = psutil.Process(pid)
    return [rank0, *rank0.children()]


def test_two_worker_job_through_the_real_server_succeeds_and_loads_in_stock_peft(tmp_path, tiny_model_dir):
    server = Server(tmp_path / "data", SQFT_THREADS_PER_JOB="2", SQFT_MODEL_ROOTS=str(tiny_model_dir))
    (tmp_path / "data").mkdir()
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            f = upload(client, write_json(tmp_path / "t.json", alpaca_records(12)))
            job = client.post("/v1/fine_tuning/jobs", json=two_worker_job(tiny_model_dir, f["id"], 2))
            assert job.status_code == 200, job.text
            done = wait_status(client, job.json()["id"], ("succeeded", "failed", "cancelled"), timeout=300)
            assert done["status"] == "succeeded", done["error"]
            log = [e["message"] for e in events(client, done["id"])]
            assert any(m.startswith("data-parallel over 2 ranks: global batch 2 examples per step") for m in log)
            # 12 examples, global batch 2, 2 epochs; one metrics row per step, from rank 0 only.
            metric_steps = [e["data"]["step"] for e in events(client, done["id"]) if e["type"] == "metrics"]
            assert sorted(set(metric_steps)) == list(range(1, 13)) and len(metric_steps) == 12
            adapter_dir = done["fine_tuned_model_path"]
    finally:
        server.stop()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(float(p.abs().max()) > 0 for p in trained)


def test_cancel_of_a_two_worker_job_ends_every_rank(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        job = client.post("/v1/fine_tuning/jobs", json=two_worker_job(tiny_model_dir, f["id"], 50)).json()
        wait_until(lambda: steps_done(client, job["id"]) >= 3, 180, interval=0.1, what="a few steps")
        ranks = job_ranks(settings.db_path, job["id"])
        assert len(ranks) == 2 and all("sqft_service.jobs.worker" in " ".join(p.cmdline()) for p in ranks)
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        assert wait_status(client, job["id"], ("cancelled", "succeeded", "failed"))["status"] == "cancelled"
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, [p.pid for p in alive]
        assert any(e["message"].startswith("stopped: stopped at step") for e in events(client, job["id"]))


@pytest.mark.parametrize("victim", ["rank 1"])
def test_a_killed_rank_cuts_the_job_short_and_it_resumes(tmp_path, tiny_model_dir, victim):
    settings = make_settings(tmp_path / "data", checkpoint_interval_s=0.0)  # a resume point after every step
    with TestClient(create_app(settings)) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        job = client.post("/v1/fine_tuning/jobs", json=two_worker_job(tiny_model_dir, f["id"], 4)).json()
        wait_until(lambda: steps_done(client, job["id"]) >= 4, 180, interval=0.05, what="a few steps")
        rank0, rank1 = job_ranks(settings.db_path, job["id"])
        os.kill(rank1.pid, signal.SIGKILL)  # one rank dies, as under the OOM killer
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        log = [e["message"] for e in events(client, job["id"])]
        assert any(m.startswith("Interrupted: the job process died (exit code 1)") for m in log)
        assert any(m.startswith("resuming from step ") for m in log)
        assert not rank0.is_running() or rank0.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(
    "training, param, words",
    [
        ({"num_training_workers": 65}, "Training.num_training_workers", "less than or equal to 64"),
        ({"num_training_workers": 0}, "Training.num_training_workers", "greater than or equal to 1"),
        ({"resources_per_worker": {"CPU": -1}}, "Training.resources_per_worker", "must be > 0"),
        ({"resources_per_worker": {"CPU": "two"}}, "Training.resources_per_worker", "is not a number"),
        ({"resources_per_worker": {"GPU": True}}, "Training.resources_per_worker", "is not a number"),
        ({"resources_per_worker": {"cpu": 2}}, "Training.resources_per_worker", "case-sensitive; use 'CPU'"),
        ({"resources_per_worker": {"": 1}}, "Training.resources_per_worker", "resource name"),
    ],
)
def test_bad_worker_settings_are_a_400_naming_the_field(client, train_file, tiny_model_dir, training, param, words):
    body = {"model": str(tiny_model_dir), "training_file": train_file["id"], "Training": training}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_gpu_per_worker_fails_the_job_under_the_subprocess_runner(client, train_file, tiny_model_dir):
    body = {"model": str(tiny_model_dir), "training_file": train_file["id"], **TWO_WORKERS}
    body["Training"] = {**TWO_WORKERS["Training"], "resources_per_worker": {"GPU": 1}}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    failed = wait_status(client, job["id"], ("failed", "succeeded"))
    assert failed["status"] == "failed" and failed["error"]["param"] == "Training.resources_per_worker"
    assert "Ray runner" in failed["error"]["message"]


def test_jobs_get_the_gpus_the_operator_lists_and_no_more_workers_than_those(tmp_path, tiny_model_dir, caplog):
    # SQFT_JOB_GPUS names two GPU ids; this machine has no GPU behind them, so the job, given "0",
    # trains on the CPU, and what is checked is what the service handed out and refused.
    settings = make_settings(tmp_path / "data", job_gpus="0,1")
    caplog.set_level("INFO", logger="sqft_service.jobs.subprocess_runner")
    with TestClient(create_app(settings)) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(8)))
        three = {**TWO_WORKERS["Training"], "num_training_workers": 3, "device": "auto"}
        resp = client.post(
            "/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": f["id"], "Training": three}
        )
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "Training.num_training_workers"
        assert "3 data-parallel workers on GPUs take one GPU each, and SQFT_JOB_GPUS has 2" in error["message"]
        body = {
            "model": str(tiny_model_dir),
            "training_file": f["id"],
            "Training": {"max_train_steps": 1, "batch_size": 2},
        }
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        assert wait_status(client, job["id"], ("succeeded", "failed"))["status"] == "succeeded"
        assert f"job {job['id']} gets GPU(s) 0" in caplog.text
        assert any(e["message"].startswith("training on device cpu") for e in events(client, job["id"]))

        # /metrics: the jobs each listed GPU runs, zeros too.
        endless = {**body, "Training": {"epochs": 1000, "batch_size": 1}}
        running = client.post("/v1/fine_tuning/jobs", json=endless).json()

        def gpu0_held():
            samples = scrape(client)
            return samples if value(samples, "sqft_gpu_jobs", gpu="0") == 1 else None

        held = wait_until(gpu0_held, 60, what="GPU 0 held")
        assert value(held, "sqft_gpu_jobs", gpu="1") == 0
        assert client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").status_code == 200
        wait_status(client, running["id"], ("cancelled",))
        assert value(scrape(client), "sqft_gpu_jobs", gpu="0") == 0  # given back
