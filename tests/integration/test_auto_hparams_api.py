"""Auto hyperparameters through the real server: the job object shows what the rule chose, and the job
process trains with exactly that."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import alpaca_records, wait_until, write_json
from tests.server import Server


@pytest.fixture
def http(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "sqft-data"
    data_dir.mkdir()
    server = Server(data_dir, SQFT_MODEL_ROOTS=str(tiny_model_dir), SQFT_THREADS_PER_JOB="1")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client
    finally:
        server.stop()


def upload(http: httpx.Client, path: Path) -> str:
    with open(path, "rb") as handle:
        resp = http.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def test_a_job_without_hyperparameters_shows_and_trains_with_the_rules_values(http, tmp_path, tiny_model_dir):
    # 270 records, 5% held out -> 256 training examples -> batch 8 (32 steps an epoch), 2 epochs (up to
    # 1,000 examples), warmup round(0.06 * 64) = 4.
    file_id = upload(http, write_json(tmp_path / "train.json", alpaca_records(270)))
    created = http.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": file_id})
    assert created.status_code == 200, created.text
    job = created.json()
    # 5e-4 is 10 x the reference's 5e-5, the rate learning_rate_multiplier scales.
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 10.0}
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    training, lora = job["config"]["Training"], job["config"]["General"]["lora_config"]
    assert (training["learning_rate"], training["lr_scheduler"], training["warmup_steps"]) == (5e-4, "cosine", 4)
    assert (lora["r"], lora["lora_alpha"]) == (16, 32)

    def ended() -> dict | None:
        got = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        return got if got["status"] in ("succeeded", "failed", "cancelled") else None

    done = wait_until(ended, 240, what="the job to end")
    assert done["status"] == "succeeded", done["error"]
    assert done["hyperparameters"] == job["hyperparameters"]

    # The job process ran the stored configuration: its own copy, the adapter PEFT saved, and its steps.
    ran = json.loads((Path(done["config"]["General"]["output_dir"]) / "training_config.json").read_text())
    assert ran["Training"]["batch_size"] == 8 and ran["Training"]["learning_rate"] == 5e-4
    adapter = json.loads((Path(done["fine_tuned_model_path"]) / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 200}).json()["data"]
    steps = {e["data"]["step"]: e["data"] for e in events if e["type"] == "metrics" and "total_steps" in e["data"]}
    assert steps[1]["total_steps"] == 64
    assert steps[1]["learning_rate"] == pytest.approx(5e-4 / 4)  # step 1 of 4 warmup steps


def test_values_the_client_sends_are_kept_even_at_the_reference_defaults(http, tmp_path, tiny_model_dir):
    file_id = upload(http, write_json(tmp_path / "train.json", alpaca_records(270)))
    body = {
        "model": str(tiny_model_dir),
        "training_file": file_id,
        "General": {"lora_config": {"r": 8, "lora_alpha": 16}},
        "Training": {"batch_size": 2, "learning_rate": 5e-5, "epochs": 1000},  # long: cancelled below
        "hyperparameters": {"n_epochs": 1},
    }
    created = http.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job = created.json()
    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    training, lora = job["config"]["Training"], job["config"]["General"]["lora_config"]
    assert (training["lr_scheduler"], training["warmup_steps"]) == ("linear", 0)  # the rate was the client's
    assert (lora["r"], lora["lora_alpha"]) == (8, 16)
