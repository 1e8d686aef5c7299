"""Preference fine-tuning (``method.type: "dpo"``) through the API: the official SDK end to end on a real
server, and the requests the service refuses, each naming its field."""

from __future__ import annotations

import math

import pytest

from tests.helpers import alpaca_records, preference_records, write_json, write_jsonl
from tests.integration.conftest import assert_job_refused, sdk_job_end, upload


def test_openai_sdk_runs_a_dpo_job_and_chats_with_its_model(sdk, tmp_path, tiny_model_dir):
    client = sdk
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
    done = sdk_job_end(client, job.id)
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
        ({"method": {"type": "reinforcement"}}, "method", "`method.reinforcement` (its grader) is required"),
        ({"method": {"type": "grpo"}}, "method.type", "'supervised', 'dpo' or 'reinforcement'"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
            "> 0",
        ),
        ({"Training": {"method": "supervised"}}, "Training.method", "contradicts `method.type` 'dpo'"),
        ({"Dataset": {"mask_input": False}}, "Dataset.mask_input", "scores the replies only"),
        ({"method": None, "Training": {"dpo_beta": 0.3}}, "Training", "`dpo_beta` applies to preference training only"),
        ({"method": None, "Training": {"dpo_loss": "ipo"}}, "Training", "`dpo_loss` applies to preference training"),
        (
            {"Training": {"dpo_loss": "hinge", "dpo_label_smoothing": 0.1}},
            "Training",
            "`dpo_label_smoothing` applies to the 'sigmoid', 'robust' and 'simpo' losses",
        ),
        ({"Training": {"dpo_label_smoothing": 0.5}}, "Training.dpo_label_smoothing", "less than 0.5"),
        ({"Training": {"dpo_simpo_gamma": 1.0}}, "Training", "`dpo_simpo_gamma` applies to the 'simpo' loss"),
    ],
)
def test_a_dpo_request_the_service_cannot_honour_is_a_400_naming_the_field(
    client, tmp_path, tiny_model_dir, pairs_file, change, param, words
):
    sft = upload(client, write_json(tmp_path / "sft.json", alpaca_records(4)))
    body = dpo_job(tiny_model_dir, pairs_file["id"])
    assert_job_refused(client, body, change, sft["id"], param, words)


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose larger init scale lets a LoRA move its log-probabilities within a few steps."""
    from tests.conftest import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama-dpo")
    make_tiny_llama(len(tokenizer), initializer_range=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dpo_trained(tmp_path_factory, learnable_model_dir):
    from fastapi.testclient import TestClient

    from sqft_service.app import create_app
    from tests.integration.conftest import make_settings, wait_status

    root = tmp_path_factory.mktemp("dpo-evaluate")
    with TestClient(create_app(make_settings(root / "data"))) as client:
        f = upload(client, write_jsonl(root / "pairs.jsonl", preference_records(24)))
        body = dpo_job(
            learnable_model_dir,
            f["id"],
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 6, "batch_size": 4}}},
            seed=7,
            Training={"learning_rate": 2e-2, "mixed_precision": "no", "logging_steps": 1},
            Dataset={"validation_split_percentage": 25},
            General={"lora_config": {"r": 4, "lora_alpha": 16}},
        )
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        job = wait_status(client, resp.json()["id"], ("succeeded", "failed"), timeout=300)
        assert job["status"] == "succeeded", job["error"]
        yield client, job, f["id"]


def test_evaluate_scores_which_reply_each_candidate_prefers(dpo_trained, learnable_model_dir):
    client, job, file_id = dpo_trained
    body = {"candidates": [str(learnable_model_dir), job["fine_tuned_model"]], "file": file_id, "max_new_tokens": 4}
    resp = client.post("/v1/finetune/evaluate", json=body)
    assert resp.status_code == 200, resp.text
    base, tuned = resp.json()["data"]
    for row in (base, tuned):
        assert row["n_examples"] == 24 and 0.0 <= row["preference_accuracy"] <= 1.0
        assert row["loss"] is not None and row["exact_match"] is not None  # scored on the preferred replies
        assert row["samples"][0]["reference"].endswith(", it is.")
    assert tuned["preference_margin"] > base["preference_margin"]  # DPO moved log-probability to the preferred
    assert tuned["preference_accuracy"] > base["preference_accuracy"]


def test_evaluate_a_dpo_jobs_held_out_pairs(dpo_trained):
    client, job, _ = dpo_trained
    body = {"candidates": [job["fine_tuned_model"]], "fine_tuning_job_id": job["id"], "generate": False}
    resp = client.post("/v1/finetune/evaluate", json=body)
    assert resp.status_code == 200, resp.text
    (row,) = resp.json()["data"]
    assert row["n_examples"] == 6 and row["preference_accuracy"] is not None  # 25% of 24 pairs held out


def test_a_trl_format_file_trains_a_dpo_job(client, tmp_path, tiny_model_dir):
    from tests.integration.conftest import wait_status

    records = [
        {"prompt": r["input"]["messages"][0]["content"], "chosen": r["preferred_output"], "rejected": "no idea"}
        for r in preference_records(4)
    ]
    trl = upload(client, write_jsonl(tmp_path / "trl.jsonl", records))
    assert trl["format"] == "preference"
    resp = client.post("/v1/fine_tuning/jobs", json=dpo_job(tiny_model_dir, trl["id"], Training={"batch_size": 2}))
    assert resp.status_code == 200, resp.text
    done = wait_status(client, resp.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    assert done["method"]["type"] == "dpo" and done["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


def test_a_dpo_job_takes_another_preference_loss(client, tiny_model_dir, pairs_file):
    """OpenAI's `method` makes it a DPO job, so the extension's DPO fields apply (checked after folding)."""
    body = dpo_job(tiny_model_dir, pairs_file["id"], Training={"dpo_loss": "robust", "dpo_label_smoothing": 0.1})
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = client.app.state.job_manager.jobs.get(resp.json()["id"])
    assert job.config["Training"]["dpo_loss"] == "robust" and job.config["Training"]["dpo_label_smoothing"] == 0.1
    assert client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel").status_code == 200


def test_a_simpo_job_has_simpos_beta_unless_given(client, tiny_model_dir, pairs_file):
    for given, beta in (({}, 2.0), ({"dpo_beta": 3.0}, 3.0)):
        training = {"dpo_loss": "simpo", "dpo_simpo_gamma": 1.0, **given}
        body = dpo_job(tiny_model_dir, pairs_file["id"], Training=training)
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["method"]["dpo"]["hyperparameters"]["beta"] == beta
        job = client.app.state.job_manager.jobs.get(resp.json()["id"])
        assert job.config["Training"]["dpo_simpo_gamma"] == 1.0
        assert client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel").status_code == 200
    # OpenAI's own beta wins, as for any DPO loss.
    body = dpo_job(tiny_model_dir, pairs_file["id"], Training={"dpo_loss": "simpo"})
    body["method"]["dpo"] = {"hyperparameters": {"beta": 4.0}}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200 and resp.json()["method"]["dpo"]["hyperparameters"]["beta"] == 4.0, resp.text
    assert client.post(f"/v1/fine_tuning/jobs/{resp.json()['id']}/cancel").status_code == 200
