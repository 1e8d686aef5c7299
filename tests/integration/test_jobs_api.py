"""/v1/fine_tuning/jobs: the real app, real SQLite, real job subprocesses on a tiny model."""

from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.devices import cuda_available
from tests.helpers import alpaca_records, wait_until, write_json, write_jsonl
from tests.integration.conftest import make_settings, upload, wait_status


def tiny_job(model_dir, training_file: str, **extra) -> dict:
    body = {
        "model": str(model_dir),
        "training_file": training_file,
        "Training": {"batch_size": 4, "epochs": 2, "learning_rate": 1e-3, "logging_steps": 1},
        "Dataset": {"validation_split_percentage": 20},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def test_job_runs_to_success_with_events_checkpoints_and_results(client, tiny_model_dir, train_file):
    body = tiny_job(
        tiny_model_dir,
        train_file["filename"],  # the reference refers to files by name
        General={"save_strategy": "epoch", "lora_config": {"r": 4, "lora_alpha": 8}},
        hyperparameters={"learning_rate_multiplier": 2},
        suffix="colors",
        metadata={"team": "x"},
        seed=7,
    )
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] in ("queued", "running")
    assert job["training_file"] == train_file["id"] and job["seed"] == 7
    assert job["user_provided_suffix"] == "colors" and job["metadata"] == {"team": "x"}
    # learning_rate_multiplier multiplies the base rate (the reference copied it in as the rate).
    assert job["config"]["Training"]["learning_rate"] == pytest.approx(2e-3)
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 4

    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["finished_at"] >= done["created_at"] and done["trained_tokens"] > 0
    # OpenAI's name (model_names.py); the adapter's path is the extension field beside it.
    assert done["fine_tuned_model"] == f"ft:{tiny_model_dir.name}:colors:{job['id']}"
    assert done["fine_tuned_model_path"].endswith("/output/adapter")

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    metrics = [e for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert metrics, events
    for e in metrics:
        assert {"step", "epoch", "train_loss", "learning_rate", "tokens_per_s", "eta_s"} <= set(e["data"])
    assert any("valid_loss" in e["data"] for e in events if e["type"] == "metrics")
    assert events[0]["message"] == "The job has successfully completed"  # newest first
    assert all(e["level"] in ("info", "warn", "error") for e in events)

    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    # Two epoch checkpoints plus the final adapter, newest first.
    assert [c["step_number"] for c in ckpts] == sorted((c["step_number"] for c in ckpts), reverse=True)
    assert len(ckpts) == 3
    assert all(c["metrics"]["train_loss"] is not None for c in ckpts)
    ref = client.post("/v1/finetune/list_checkpoints", json={"fine_tuning_job_id": job["id"]}).json()
    assert [c["id"] for c in ref] == [c["id"] for c in ckpts]

    (result_id,) = done["result_files"]
    meta = client.get(f"/v1/files/{result_id}").json()
    assert meta["purpose"] == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/files/{result_id}/content").text)))
    assert [int(r["step"]) for r in rows] == list(range(1, ckpts[0]["step_number"] + 1))
    assert {"step", "train_loss", "valid_loss"} <= set(rows[0])

    log = client.get(f"/v1/fine_tuning/jobs/{job['id']}/log")
    assert log.status_code == 200 and "job process started" in log.text


def test_state_survives_a_restart(data_dir, tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(data_dir))) as first:
        f = upload(first, write_json(tmp_path / "t.json", alpaca_records(8)))
        job = first.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, f["id"])).json()
        done = wait_status(first, job["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        n_events = len(first.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"])
        ckpts = first.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    with TestClient(create_app(make_settings(data_dir))) as second:
        assert second.get(f"/v1/files/{f['id']}").status_code == 200
        again = second.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert again["status"] == "succeeded" and again["trained_tokens"] == done["trained_tokens"]
        assert len(second.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]) == n_events
        assert second.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == ckpts


@pytest.mark.parametrize("case", ["outcome_written", "no_outcome", "launches_used_up"])
def test_running_job_after_a_crash(data_dir, tmp_path, tiny_model_dir, case):
    """A service that died mid-job: on restart the job must not stay 'running' forever. If its process
    finished meanwhile (outcome written), the job keeps that outcome; otherwise it is queued again and
    completes, unless it has used up its launches."""
    from sqft_service.store.db import Database
    from sqft_service.store.jobs import JobStore

    settings = make_settings(data_dir, max_job_attempts=2)
    with TestClient(create_app(settings)) as first:
        f = upload(first, write_json(tmp_path / "t.json", alpaca_records(8)))
        job = first.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, f["id"])).json()
        assert wait_status(first, job["id"], ("succeeded", "failed"))["status"] == "succeeded"
    db = Database(data_dir / "sqft.db")  # the crash as the store saw it: the row still says running
    attempts = 2 if case == "launches_used_up" else 1
    JobStore(db).update(
        job["id"], status="running", finished_at=None, fine_tuned_model=None, pid=999999, attempts=attempts
    )
    db.close()
    if case != "outcome_written":  # the process died before it could write how it ended
        (data_dir / "jobs" / job["id"] / "outcome.json").unlink()
    with TestClient(create_app(settings)) as second:
        again = wait_status(second, job["id"], ("succeeded", "failed"))
        messages = [
            e["message"] for e in second.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
        ]
        if case == "outcome_written":
            assert again["fine_tuned_model_path"].endswith("/output/adapter")
            assert "The job process finished while the service was down" in messages
        elif case == "no_outcome":
            assert again["status"] == "succeeded" and again["fine_tuned_model_path"].endswith("/output/adapter")
            assert any(m.startswith("Interrupted: the service stopped; queued again") for m in messages)
            assert "Fine-tuning job started again (launch 2)" in messages
        else:
            assert again["status"] == "failed" and again["error"]["code"] == "service_restarted"
            assert "interrupted on each of its 2 launches" in again["error"]["message"]


def test_cancel_running_job_keeps_partial_checkpoints(client, tmp_path, tiny_model_dir):
    f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
    body = tiny_job(
        tiny_model_dir,
        f["id"],
        Training={"epochs": 1000, "batch_size": 1},
        General={"save_strategy": "steps", "save_steps": 2},
    )
    job = client.post("/v1/fine_tuning/jobs", json=body).json()

    def has_checkpoint():
        return client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]

    wait_until(has_checkpoint, 120, what="a first checkpoint")
    resp = client.post("/v1/fine_tuning/jobs/cancel", json={"fine_tuning_job_id": job["id"]})
    assert resp.status_code == 200
    done = wait_status(client, job["id"], ("cancelled", "failed", "succeeded"), timeout=60)
    assert done["status"] == "cancelled"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_not_cancellable"


def test_queue_honours_max_concurrency_and_cancels_queued(data_dir, tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(data_dir, max_concurrent_jobs=1))) as c:
        f = upload(c, write_json(tmp_path / "t.json", alpaca_records(16)))
        slow = tiny_job(tiny_model_dir, f["id"], Training={"epochs": 1000, "batch_size": 1})
        first = c.post("/v1/fine_tuning/jobs", json=slow).json()
        second = c.post("/v1/fine_tuning/jobs", json=slow).json()
        wait_status(c, first["id"], ("running",))
        assert c.get(f"/v1/fine_tuning/jobs/{second['id']}").json()["status"] == "queued"
        cancelled = c.post(f"/v1/fine_tuning/jobs/{second['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        c.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
        assert wait_status(c, first["id"], ("cancelled",), timeout=60)["status"] == "cancelled"


def test_list_jobs_pagination(client, train_file, tiny_model_dir):
    ids = []
    for _ in range(3):
        body = tiny_job(tiny_model_dir, train_file["id"])
        ids.append(client.post("/v1/fine_tuning/jobs", json=body).json()["id"])
        client.post(f"/v1/fine_tuning/jobs/{ids[-1]}/cancel")
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    every = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"limit": 100}).json()["data"]
    assert len(every) >= 4
    first = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"limit": 2}).json()
    assert first["has_more"] is True and first["data"] == every[:2]
    after = {"limit": 100, "after": first["data"][-1]["id"]}
    second = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params=after).json()
    assert second["data"] == every[2:] and second["has_more"] is False


def test_list_jobs_filters_by_metadata_as_openai_does(client, train_file, tiny_model_dir):
    tags = [{"team": "a", "run": "1"}, {"team": "a", "run": "2"}, {"team": "b", "run": "1"}, None]
    ids = []
    for metadata in tags:
        body = tiny_job(tiny_model_dir, train_file["id"], **({"metadata": metadata} if metadata else {}))
        ids.append(client.post("/v1/fine_tuning/jobs", json=body).json()["id"])
        client.post(f"/v1/fine_tuning/jobs/{ids[-1]}/cancel")

    def listed(query: str) -> list[str]:
        resp = client.get(f"/v1/fine_tuning/jobs?{query}")
        assert resp.status_code == 200, resp.text
        return [j["id"] for j in resp.json()["data"]]

    assert listed("metadata[team]=a") == [ids[1], ids[0]]
    assert listed("metadata[team]=a&metadata[run]=1") == [ids[0]]
    assert listed("metadata[run]=1&limit=1") == [ids[2]]
    assert listed("metadata[team]=c") == [] and listed("metadata[Team]=a") == []
    assert listed("metadata=null") == [ids[3]]
    assert listed("") == ids[::-1]
    for query, needle in [("metadata=x", "metadata=null"), (f"metadata[{'k' * 65}]=v", "65 characters")]:
        resp = client.get(f"/v1/fine_tuning/jobs?{query}")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "metadata"
        assert needle in resp.json()["error"]["message"]


def test_missing_model_is_a_400_and_an_unloadable_one_fails_the_job_readably(client, train_file, tmp_path):
    resp = client.post("/v1/fine_tuning/jobs", json=tiny_job(tmp_path / "no-such-model", train_file["id"]))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model", resp.text
    assert resp.json()["error"]["code"] == "model_not_found"
    (tmp_path / "not-a-model").mkdir()  # exists under a model root, but nothing loads from it
    job = client.post("/v1/fine_tuning/jobs", json=tiny_job(tmp_path / "not-a-model", train_file["id"])).json()
    done = wait_status(client, job["id"], ("failed", "succeeded"))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_model" and done["error"]["param"] == "model"
    assert "no config.json" in done["error"]["message"] and "Traceback" not in done["error"]["message"]


def test_reference_routes_accept_unquoted_ids(client, train_file, tiny_model_dir):
    job = client.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, train_file["id"])).json()
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    raw = '{"fine_tuning_job_id": ' + job["id"] + "}"  # what the reference README's curl sends
    got = client.post("/v1/fine_tuning/jobs/retrieve", content=raw, headers={"Content-Type": "application/json"})
    assert got.status_code == 200 and got.json()["id"] == job["id"]


BAD_JOBS = [
    ({"training_file": "nope.json"}, 404, "training_file", "No such File object: nope.json"),
    ({"trainig_file": "x"}, 400, "trainig_file", "Unknown parameter `trainig_file`"),
    ({"General": {"lora_config": {"rr": 4}}}, 400, "General.lora_config.rr", "Unknown parameter"),
    ({"Training": {"batch_size": 0}}, 400, "Training.batch_size", "Invalid value"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "Invalid value"),
    ({"Training": {"optimizer": "adam_w"}}, 400, "Training.optimizer", "Invalid value"),
    (
        {
            "General": {
                "lora_config": {
                    "neural_lora_search": True,
                    "target_module_groups": [["q_proj"], ["v_proj"]],
                    "search_space": ["8,4"],
                }
            }
        },
        400,
        "General.lora_config",
        "`search_space` has 1 entries but `target_module_groups` has 2",
    ),
    (
        {
            "General": {
                "lora_config": {
                    "r": 8,
                    "neural_lora_search": True,
                    "target_module_groups": [["q_proj"]],
                    "search_space": ["16,8"],
                }
            }
        },
        400,
        "General.lora_config",
        "`search_space[0]` has rank 16, outside [1, r=8]",
    ),
    (
        {
            "General": {
                "lora_config": {
                    "neural_lora_search": True,
                    "target_module_groups": [["q_proj"]],
                    "search_space": ["8;4"],
                }
            }
        },
        400,
        "General.lora_config",
        "`search_space[0]` = '8;4' is not a comma-separated list of integers",
    ),
]


@pytest.mark.parametrize(("patch", "status", "param", "needle"), BAD_JOBS)
def test_bad_job_requests(client, train_file, tiny_model_dir, patch, status, param, needle):
    body = {"model": str(tiny_model_dir), "training_file": train_file["id"], **patch}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("get", "/v1/fine_tuning/jobs/ftjob-missing", None),
        ("get", "/v1/fine_tuning/jobs/ftjob-missing/events", None),
        ("get", "/v1/fine_tuning/jobs/ftjob-missing/checkpoints", None),
        ("post", "/v1/fine_tuning/jobs/ftjob-missing/cancel", None),
        ("post", "/v1/fine_tuning/jobs/retrieve", {"fine_tuning_job_id": "ftjob-missing"}),
        ("post", "/v1/fine_tuning/jobs/cancel", {"fine_tuning_job_id": "ftjob-missing"}),
        ("post", "/v1/finetune/list_checkpoints", {"fine_tuning_job_id": "ftjob-missing"}),
    ],
)
def test_unknown_job_is_404_everywhere(client, method, route, body):
    resp = getattr(client, method)(route, **({"json": body} if body is not None else {}))
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["message"] == "No such fine-tuning job: ftjob-missing" and err["type"] == "invalid_request_error"


def test_health_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/fine_tuning/jobs/{job_id}/checkpoints" in paths and "/v1/finetune/list_checkpoints" in paths


def test_reference_json_body_is_accepted_verbatim(client, train_file, tiny_model_dir):
    raw = json.dumps({"training_file": train_file["filename"], "model": str(tiny_model_dir)})
    resp = client.post("/v1/fine_tuning/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200
    client.post(f"/v1/fine_tuning/jobs/{resp.json()['id']}/cancel")


def test_chat_jsonl_job_trains(client, tmp_path, tiny_model_dir):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {c}."},
                      {"role": "assistant", "content": c}]}
        for c in ["red", "blue", "green", "black"] * 3
    ]  # fmt: skip
    f = upload(client, write_jsonl(tmp_path / "chat.jsonl", records))
    job = client.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, f["id"])).json()
    done = wait_status(client, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    assert done["trained_tokens"] > 0


def test_data_rejected_in_the_job_fails_only_that_job(client, train_file, tiny_model_dir):
    # Prompts longer than max_length leave no response token: the job fails naming why, others succeed.
    bad = tiny_job(tiny_model_dir, train_file["id"], Dataset={"max_length": 8, "max_source_length": 8})
    good = tiny_job(tiny_model_dir, train_file["id"])
    bad_id = client.post("/v1/fine_tuning/jobs", json=bad).json()["id"]
    good_id = client.post("/v1/fine_tuning/jobs", json=good).json()["id"]
    failed = wait_status(client, bad_id, ("failed", "succeeded"))
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_training_file" and failed["error"]["param"] == "training_file"
    assert "no training example has a token left" in failed["error"]["message"]
    assert wait_status(client, good_id, ("failed", "succeeded"))["status"] == "succeeded"


@pytest.mark.parametrize(
    "training, param, words",
    [
        pytest.param(
            {"device": "cuda"},
            "Training.device",
            "no CUDA GPU",
            marks=pytest.mark.skipif(cuda_available(), reason="this machine has a CUDA GPU: 'cuda' is accepted"),
        ),
    ],
)
def test_config_fields_this_version_cannot_honour_are_rejected(
    client, train_file, tiny_model_dir, training, param, words
):
    before = client.get("/v1/fine_tuning/jobs").json()["data"]
    resp = client.post("/v1/fine_tuning/jobs", json=tiny_job(tiny_model_dir, train_file["id"], Training=training))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == before  # nothing was created
