"""The whole service on a GPU machine: the real server, a fine-tune left at "auto", its model served.

`sqft serve` in a subprocess, a tiny Llama under the test's directory. The job is created with
nothing about devices in it: it trains on the GPU in bf16 and its events say so, its metrics carry the
GPU's peak memory, the job was handed a GPU of its own (``jobs/gpus.py``), and the fine-tuned model
answers a chat completion. The service's own packages (FastAPI, uvicorn, httpx, ...) are not in the
GPU image: ``bench/gpu/prepare_carry.sh`` carries them, so they are imported inside the test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, write_json


def test_a_job_left_at_auto_trains_on_the_gpu_and_its_model_is_served(tmp_path, gpu_tokenizer_dir):
    import httpx
    from transformers import AutoTokenizer

    from tests.server import Server

    tokenizer = AutoTokenizer.from_pretrained(gpu_tokenizer_dir)
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer), initializer_range=0.3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    server = Server(tmp_path / "data", SQFT_MODEL_ROOTS=str(tmp_path))
    (tmp_path / "data").mkdir()
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            data = write_json(tmp_path / "train.json", alpaca_records(32))
            with open(data, "rb") as handle:
                upload = client.post("/v1/files", files={"file": ("train.json", handle)}, data={"purpose": "fine-tune"})
            assert upload.status_code == 200, upload.text
            body = {
                "model": str(model_dir),
                "training_file": upload.json()["id"],
                "Training": {"max_train_steps": 4, "batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2},
            }
            job = client.post("/v1/fine_tuning/jobs", json=body)
            assert job.status_code == 200, job.text
            done = _wait(client, job.json()["id"])
            assert done["status"] == "succeeded", done["error"]
            events = client.get(f"/v1/fine_tuning/jobs/{done['id']}/events?limit=1000").json()["data"]
            placed = [e for e in events if e["message"].startswith("training on device cuda:0")]
            assert placed and "in bf16 autocast" in placed[0]["message"], [e["message"] for e in events][-20:]
            assert "CUDA_VISIBLE_DEVICES=" in placed[0]["message"]  # the GPU the runner handed it
            rows = [e["data"] for e in events if e["type"] == "metrics" and "train_loss" in (e.get("data") or {})]
            assert rows and all(row.get("gpu_peak_memory_gib", 0) > 0 for row in rows)
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "model": done["fine_tuned_model"],
                    "messages": [{"role": "user", "content": "Name a colour."}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert "gets GPU(s)" in Path(server.log_path).read_text()


def _wait(client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {json.dumps(job)[:500]}")
