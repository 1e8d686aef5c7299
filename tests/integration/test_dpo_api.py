"""Preference fine-tuning (``method.type: "dpo"``) through the API: the official SDK end to end on a real
server, and the requests the service refuses, each naming its field."""

from __future__ import annotations

import math

import pytest
from openai import OpenAI

from tests.helpers import alpaca_records, preference_records, wait_until, write_json, write_jsonl
from tests.integration.conftest import PYTEST_TMP_ROOT, upload
from tests.server import Server


def test_openai_sdk_runs_a_dpo_job_and_chats_with_its_model(tmp_path, tiny_model_dir):
    server = Server(
        tmp_path / "data",
        SQFT_MODEL_ROOTS=str(PYTEST_TMP_ROOT[0]),
        SQFT_THREADS_PER_JOB="1",
        SQFT_INFERENCE_THREADS="1",
    )
    server.start()
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with open(write_jsonl(tmp_path / "pairs.jsonl", preference_records(12)), "rb") as handle:
            uploaded = client.files.create(file=handle, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=str(tiny_model_dir),
            training_file=uploaded.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 4}}},
            extra_body={"Training": {"logging_steps": 1}},
        )
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
        assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
        done = wait_until(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            240,
            what="the job to finish",
        )
        assert done.status == "succeeded", done.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        texts = [e.message for e in events]
        assert any("DPO reference: log-probabilities of 12 pairs" in t and "beta 0.25" in t for t in texts), texts
        first = next(e.data for e in reversed(events) if e.type == "metrics" and (e.data or {}).get("step") == 1)
        assert first["train_loss"] == pytest.approx(math.log(2), abs=0.02)  # the policy starts as the reference

        answer = client.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "The sky is red. What color is the sky?"}],
            max_tokens=5,
            temperature=0,
        )
        assert answer.model == done.fine_tuned_model and 1 <= answer.usage.completion_tokens <= 5
    finally:
        server.stop()


def dpo_job(model, file_id: str, **extra) -> dict:
    return {"model": str(model), "training_file": file_id, "method": {"type": "dpo"}, **extra}


@pytest.fixture
def pairs_file(client, tmp_path) -> dict:
    return upload(client, write_jsonl(tmp_path / "pairs.jsonl", preference_records(4)))


def test_an_uploaded_preference_file_says_its_format(pairs_file):
    assert pairs_file["format"] == "preference" and pairs_file["n_records"] == 4


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"training_file": "sft"}, "training_file", "a dpo job needs preference records"),
        ({"method": {"type": "supervised"}}, "training_file", "train on them with `method.type` 'dpo'"),
        ({"method": None}, "training_file", "train on them with `method.type` 'dpo'"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method", "`method.supervised` given with `method.type` 'dpo'"),
        ({"method": {"type": "reinforcement"}}, "method.type", "'supervised' or 'dpo'"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
            "> 0",
        ),
        ({"Training": {"method": "supervised"}}, "Training.method", "contradicts `method.type` 'dpo'"),
        ({"Dataset": {"mask_input": False}}, "Dataset.mask_input", "scores the replies only"),
        ({"method": None, "Training": {"dpo_beta": 0.3}}, "Training", "`dpo_beta` applies to preference training only"),
    ],
)
def test_a_dpo_request_the_service_cannot_honour_is_a_400_naming_the_field(
    client, tmp_path, tiny_model_dir, pairs_file, change, param, words
):
    sft = upload(client, write_json(tmp_path / "sft.json", alpaca_records(4)))
    body = dpo_job(tiny_model_dir, pairs_file["id"])
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = sft["id"] if value == "sft" else value
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created
