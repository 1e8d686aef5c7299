"""/v1/finetune/evaluate: the real app, real job processes, a tiny Llama.

One Alpaca job is trained on a repetitive file, then evaluated against its
base on that file. Assertions are about structure and relations (the adapter learned its data), never
about quality.
"""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import alpaca_records, write_json
from tests.integration.conftest import make_settings, upload, wait_status
from tests.integration.test_operations_api import wait_op

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("evaluate")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb")
    with TestClient(create_app(settings), headers=ALICE) as client:
        f = upload(client, write_json(root / "a.json", alpaca_records(16)))
        body = {
            "model": str(tiny_model_dir),
            "training_file": f["id"],
            # fp32 like the evaluate job, so its scores can be held to the job's own to 1e-4 (on a bf16
            # CPU "auto" would train and evaluate in bf16).
            "Training": {"batch_size": 4, "epochs": 2, "learning_rate": 1e-2, "mixed_precision": "no"},
            "General": {"lora_config": {"r": 4, "lora_alpha": 16}},
        }
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        job = wait_status(client, resp.json()["id"], ("succeeded", "failed"), timeout=300)
        assert job["status"] == "succeeded", job["error"]
        yield client, {"base": str(tiny_model_dir), "ft": job["fine_tuned_model"], "file": f["id"]}


def test_base_and_adapter_scored_on_the_same_records(trained):
    client, t = trained
    resp = client.post(
        "/v1/finetune/evaluate",
        json={"candidates": [t["base"], t["ft"]], "file": t["file"], "max_samples": 8, "max_new_tokens": 8},
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["object"] == "finetune.evaluation" and result["file"] == t["file"]
    base, ft = result["data"]
    assert [base["candidate"], ft["candidate"]] == [t["base"], t["ft"]]
    for row in (base, ft):
        assert row["n_examples"] == 8 and row["n_label_tokens"] > 0
        assert math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-6)
        for rate in ("token_accuracy", "exact_match", "contains_match"):
            assert 0.0 <= row[rate] <= 1.0
        assert len(row["samples"]) == 3
        assert set(row["samples"][0]) == {"prompt", "reference", "output"}
        assert "### Response:" in row["samples"][0]["prompt"]
    assert base["n_label_tokens"] == ft["n_label_tokens"]  # same records, same tokenization
    assert ft["loss"] < base["loss"]  # the job learned its data


def test_async_evaluation_is_an_operation(trained):
    client, t = trained
    resp = client.post(
        "/v1/finetune/evaluate", json={"candidates": [t["ft"]], "file": t["file"], "generate": False, "wait": False}
    )
    assert resp.status_code == 202, resp.text
    op = resp.json()
    assert op["object"] == "finetune.operation" and op["kind"] == "evaluate"
    listed = client.get("/v1/finetune/operations", params={"kind": "evaluate"}).json()["data"]
    assert op["id"] in [o["id"] for o in listed]
    done = wait_op(client, op["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    (row,) = done["result"]["data"]
    assert row["exact_match"] is None and row["samples"] == [] and row["loss"] > 0
    events = client.get(f"/v1/finetune/operations/{op['id']}/events").json()["data"]
    assert any(t["ft"] in e["message"] for e in events)


def test_bad_candidates_name_the_field(trained):
    client, t = trained
    cases = [
        ({"candidates": [], "file": t["file"]}, 400),
        ({"candidates": [t["ft"] + "x"], "file": t["file"]}, 404),
        ({"candidates": ["ft:model:sqft:ftjob-nope"], "file": t["file"]}, 404),
        ({"candidates": ["/no/such/model"], "file": t["file"]}, 400),
        ({"candidates": [t["base"], t["base"]], "file": t["file"]}, 400),
    ]
    for body, status in cases:
        resp = client.post("/v1/finetune/evaluate", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["param"].startswith("candidates"), resp.text
    # Another project's fine-tuned model and file are 404s.
    resp = client.post("/v1/finetune/evaluate", json={"candidates": [t["ft"]], "file": t["file"]}, headers=BOB)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "candidates", resp.text
    resp = client.post("/v1/finetune/evaluate", json={"candidates": [t["base"]], "file": t["file"]}, headers=BOB)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "file", resp.text


def test_a_jobs_validation_split(trained):
    """The job's held-out examples (5% of 16: one), scored as its own end-of-training evaluation scored them."""
    client, t = trained
    job_id = t["ft"].split(":")[3]
    resp = client.post(
        "/v1/finetune/evaluate", json={"candidates": [t["ft"]], "fine_tuning_job_id": job_id, "generate": False}
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["fine_tuning_job_id"] == job_id and result["file"] is None
    (row,) = result["data"]
    assert row["n_examples"] == 1
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    valid = [e["data"]["valid_loss"] for e in events if (e.get("data") or {}).get("valid_loss") is not None]
    assert valid, "the job reported no validation loss"
    # `events` is newest first: the last evaluation used the final adapter.
    assert math.isclose(row["loss"], valid[0], rel_tol=1e-4), (row["loss"], valid)
    both = client.post(
        "/v1/finetune/evaluate", json={"candidates": [t["ft"]], "file": t["file"], **{"fine_tuning_job_id": job_id}}
    )
    assert both.status_code == 400, both.text


def test_cancel_an_evaluation(trained):
    client, t = trained
    body = {"candidates": [t["base"], t["ft"]], "file": t["file"], "max_samples": 1024, "wait": False}
    op = client.post("/v1/finetune/evaluate", json=body).json()
    # The file it reads cannot be deleted while it runs.
    assert client.delete(f"/v1/files/{t['file']}").status_code == 409
    resp = client.post(f"/v1/finetune/operations/{op['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert wait_op(client, op["id"], ("succeeded", "failed", "cancelled"))["status"] == "cancelled"


def test_cli_evaluate(tmp_path, tiny_model_dir):
    import json

    from sqft_service.cli import main

    data = write_json(tmp_path / "a.json", alpaca_records(4))
    out = tmp_path / "result.json"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "4"]
    assert main([*argv, "--model-cache", str(tmp_path / "models"), "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["data"]
    assert row["n_examples"] == 4 and math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-6)
