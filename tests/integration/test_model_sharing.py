"""Sharing a fine-tuned model with another project (OpenAI's checkpoint permissions): the real app,
three projects, a real job on the tiny Llama. The grantee lists, uses and builds on the model; it can't
delete or re-share it; a revoked share is a 404 again."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import CHAT, wait_until, write_jsonl
from tests.integration.conftest import make_settings

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
CAROL = {"Authorization": "Bearer kc"}
ASK = [{"role": "user", "content": "Repeat the word red."}]


def _train(client, model: str, file_id: str, headers: dict) -> dict:
    body = {"model": model, "training_file": file_id, "Training": {"batch_size": 4, "epochs": 1, "learning_rate": 5e-2}}
    job = client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert job.status_code == 200, job.text

    def ended():
        done = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}", headers=headers).json()
        return done if done["status"] in ("succeeded", "failed") else None

    done = wait_until(ended, 300, what="the fine-tune to end")
    assert done["status"] == "succeeded", done["error"]
    return done


def _upload(client, path, headers: dict) -> str:
    with open(path, "rb") as handle:
        resp = client.post(
            "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}, headers=headers
        )
    return resp.json()["id"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sharing")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb,carol:kc", inference_threads=1)
    with TestClient(create_app(settings), headers=ALICE) as client:
        data = write_jsonl(root / "c.jsonl", [CHAT] * 8)
        job = _train(client, str(tiny_model_dir), _upload(client, data, ALICE), ALICE)
        yield client, job["fine_tuned_model"], data


def _permissions(model: str) -> str:
    return f"/v1/fine_tuning/checkpoints/{model}/permissions"


def _chat(client, model: str, headers: dict):
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": ASK, "max_tokens": 6, "temperature": 0},
        headers=headers,
    )


def test_a_shared_model_is_listed_used_and_built_on_but_not_deleted_or_reshared(shared):
    client, model, data = shared
    assert _chat(client, model, BOB).status_code == 404
    assert model not in [m["id"] for m in client.get("/v1/models", headers=BOB).json()["data"]]

    granted = client.post(_permissions(model), json={"project_ids": ["bob"]})
    assert granted.status_code == 200, granted.text
    (permission,) = granted.json()["data"]
    assert permission["object"] == "checkpoint.permission" and permission["project_id"] == "bob"
    assert permission["id"].startswith("cp_")
    again = client.post(_permissions(model), json={"project_ids": ["bob"]}).json()["data"]
    assert [p["id"] for p in again] == [permission["id"]]  # granting twice is one permission

    # Bob lists it (as Alice's), reads it, chats with it as Alice does; Carol still has no such model.
    listed = {m["id"]: m for m in client.get("/v1/models", headers=BOB).json()["data"]}
    assert listed[model]["owned_by"] == "alice"
    assert client.get(f"/v1/models/{model}", headers=BOB).status_code == 200
    answer = _chat(client, model, BOB)
    assert answer.status_code == 200 and answer.json()["choices"] == _chat(client, model, ALICE).json()["choices"]
    assert _chat(client, model, CAROL).status_code == 404
    # Bob fine-tunes on from it: his own job and model, trained on Alice's.
    tuned = _train(client, model, _upload(client, data, BOB), BOB)
    assert _chat(client, tuned["fine_tuned_model"], BOB).status_code == 200
    assert _chat(client, tuned["fine_tuned_model"], ALICE).status_code == 404

    # Only Alice deletes or shares it, or sees its permissions.
    for resp in (
        client.delete(f"/v1/models/{model}", headers=BOB),
        client.post(_permissions(model), json={"project_ids": ["carol"]}, headers=BOB),
        client.get(_permissions(model), headers=BOB),
    ):
        assert resp.status_code == 403 and resp.json()["error"]["param"] == "model", resp.text
    listed = client.get(_permissions(model), params={"project_id": "bob"}).json()
    assert [p["id"] for p in listed["data"]] == [permission["id"]] and not listed["has_more"]

    # Revoked: a 404 to Bob again, and gone from his list.
    revoked = client.delete(f"{_permissions(model)}/{permission['id']}")
    assert revoked.json() == {"id": permission["id"], "object": "checkpoint.permission", "deleted": True}
    assert _chat(client, model, BOB).status_code == 404
    assert model not in [m["id"] for m in client.get("/v1/models", headers=BOB).json()["data"]]
    assert client.get(_permissions(model)).json()["data"] == []


def test_bad_shares_name_the_field(shared, tmp_path):
    client, model, _ = shared
    cases = [
        (client.post(_permissions(model), json={"project_ids": ["dave"]}), 400, "project_ids"),
        (client.post(_permissions(model), json={"project_ids": ["alice"]}), 400, "project_ids"),
        (client.post(_permissions(model), json={"project_ids": []}), 400, "project_ids"),
        (client.post(_permissions("ft:x:sqft:ftjob-missing"), json={"project_ids": ["bob"]}), 404, "model"),
        (client.delete(f"{_permissions(model)}/cp_missing"), 404, "permission_id"),
    ]
    for resp, status, param in cases:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["param"] == param, resp.text
    # One tenant (no keys): there is no other project.
    with TestClient(create_app(make_settings(tmp_path / "data"))) as alone:
        resp = alone.post(_permissions(model), json={"project_ids": ["bob"]})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "project_ids"
