"""Fine-tuning a fine-tuned model (OpenAI's `model: "ft:…"`): supervised, merged, then DPO on it, served,
merged and evaluated; what the service refuses. The real app, real job processes, a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from sqft_service.api.models.service import BASE_OWNER
from sqft_service.app import create_app
from tests.helpers import alpaca_records, preference_records, write_json, write_jsonl
from tests.integration.conftest import make_settings, upload, wait_status

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}


def _done(client: TestClient, body: dict) -> dict:
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = wait_status(client, resp.json()["id"], ("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("continued")
    # The tiny model's directory is the only model root: the data dir (the jobs' outputs) lies outside it.
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb", model_roots=(tiny_model_dir,))
    with TestClient(create_app(settings), headers=ALICE) as client:
        sft_file = upload(client, write_json(root / "sft.json", alpaca_records(8)))
        sft = _done(
            client,
            {"model": str(tiny_model_dir), "training_file": sft_file["id"], "seed": 1, "Training": {"batch_size": 4}},
        )
        merged = client.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": sft["id"]})
        assert merged.status_code == 200, merged.text
        pairs = upload(client, write_jsonl(root / "pairs.jsonl", preference_records(8)))
        parent = f"{sft['fine_tuned_model']}:merged"
        dpo = _done(
            client,
            {"model": parent, "training_file": pairs["id"], "seed": 1, "method": {"type": "dpo"}, "suffix": "dpo"},
        )
        # Straight from the adapter: the job merges it into its base first.
        from_adapter = _done(
            client,
            {"model": sft["fine_tuned_model"], "training_file": pairs["id"], "seed": 1, "method": {"type": "dpo"}},
        )
        yield client, sft, merged.json(), parent, dpo, pairs, from_adapter


def test_a_dpo_job_trains_on_from_a_merged_fine_tuned_model(chain, tiny_model_dir):
    client, _, merged, parent, dpo, _ = chain[:6]
    assert dpo["model"] == parent  # as the client named it
    assert dpo["config"]["General"]["base_model"] == merged["path"]  # what it loaded
    # Named after the original base, as OpenAI names the fine-tune of a fine-tuned model.
    assert dpo["fine_tuned_model"] == f"ft:{tiny_model_dir.name}:dpo:{dpo['id']}"
    listed = client.get("/v1/models").json()["data"]
    assert {dpo["fine_tuned_model"], parent} <= {m["id"] for m in listed}
    # The parent is listed once, as the fine-tuned model it is, not again as a base model.
    assert [m["id"] for m in listed if m["owned_by"] == BASE_OWNER] == [str(tiny_model_dir)]

    # Served on its own base (the merged parent), chat works; its merge starts from that base too.
    answer = client.post(
        "/v1/chat/completions",
        json={"model": dpo["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert answer.status_code == 200, answer.text
    # Also as GGUF: its settings and tokenizer from the merged parent's directory.
    resp = client.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": dpo["id"], "gguf": "f32"})
    assert resp.status_code == 200, resp.text
    exported = Path(resp.json()["gguf"]["path"])
    from_gguf = AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name).state_dict()
    grandchild = AutoModelForCausalLM.from_pretrained(resp.json()["path"]).state_dict()
    assert all(torch.equal(value, from_gguf[key]) for key, value in grandchild.items())
    parent_weights = AutoModelForCausalLM.from_pretrained(merged["path"]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(parent_weights[key], base[key])  # the SFT adapter is in the parent
    assert not torch.equal(grandchild[key], parent_weights[key])  # and the DPO adapter on top of it


def test_evaluate_compares_a_chain(chain):
    client, _, _, parent, dpo, pairs = chain[:6]
    body = {"candidates": [parent, dpo["fine_tuned_model"]], "file": pairs["id"], "generate": False}
    resp = client.post("/v1/finetune/evaluate", json=body)
    assert resp.status_code == 200, resp.text
    rows = resp.json()["data"]
    assert [r["candidate"] for r in rows] == body["candidates"]
    assert all(r["preference_accuracy"] is not None for r in rows)


def test_a_job_trains_on_from_an_adapter_merged_in_first(chain):
    client, sft, merged, _, _, _, from_adapter = chain
    config = from_adapter["config"]["General"]
    assert from_adapter["model"] == sft["fine_tuned_model"]
    assert config["parent"]["model"] == sft["fine_tuned_model"] and config["parent"]["adapter"].endswith("/adapter")
    assert config["base_model"].endswith("/output/parent_merged")
    events = client.get(f"/v1/fine_tuning/jobs/{from_adapter['id']}/events", params={"limit": 100}).json()["data"]
    assert any(f"merging {sft['fine_tuned_model']} into its base" in e["message"] for e in events)
    # The merge the job made is the merge `merge_adapter` made.
    ours = AutoModelForCausalLM.from_pretrained(config["base_model"]).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(merged["path"]).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    chat = {"model": from_adapter["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200


def test_what_the_service_refuses(chain):
    client, _, merged, parent, _, pairs = chain[:6]
    forged = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": parent,
            "training_file": pairs["id"],
            "method": {"type": "dpo"},
            "General": {"parent": {"model": parent, "base_model": merged["path"], "adapter": merged["path"]}},
        },
    )
    assert forged.status_code == 400 and forged.json()["error"]["param"] == "General.parent", forged.text
    # Another project's model is not found; the merged directory named by path stays outside the roots.
    other = client.post("/v1/fine_tuning/jobs", json={"model": parent, "training_file": "x"}, headers=BOB)
    assert other.status_code == 404 and other.json()["error"]["param"] == "model", other.text
    by_path = client.post("/v1/fine_tuning/jobs", json={"model": merged["path"], "training_file": pairs["id"]})
    assert by_path.status_code == 400 and by_path.json()["error"]["param"] == "model", by_path.text


def test_an_adapter_stays_until_the_job_that_merges_it_has_ended(chain):
    client, _, _, _, _, pairs, from_adapter = chain
    name = from_adapter["fine_tuned_model"]  # a fine-tuned model of a fine-tuned model, as a parent again
    body = {"model": name, "training_file": pairs["id"], "method": {"type": "dpo"}, "Training": {"epochs": 1000}}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["config"]["General"]["parent"]["base_model"] == from_adapter["config"]["General"]["base_model"]
    refused = client.delete(f"/v1/models/{name}")
    assert refused.status_code == 409 and job["id"] in refused.json()["error"]["message"], refused.text
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    wait_status(client, job["id"], ("cancelled",))
    assert client.delete(f"/v1/models/{name}").status_code == 200


def test_a_merged_model_a_job_trains_on_from_is_not_deleted(chain):
    client, sft, _, parent, dpo, _ = chain[:6]
    resp = client.delete(f"/v1/models/{parent}")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "model_in_use", resp.text
    assert dpo["id"] in resp.json()["error"]["message"]
    # The adapter it was merged from may go: the merged model is a directory of its own.
    assert client.delete(f"/v1/models/{sft['fine_tuned_model']}").status_code == 200
    assert client.get(f"/v1/models/{parent}").status_code == 200
    chat = {"model": dpo["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    # Once no adapter is left to load on it (the DPO job's merged model stands alone), it may go too.
    assert client.delete(f"/v1/models/{dpo['fine_tuned_model']}").status_code == 200
    assert client.delete(f"/v1/models/{parent}").status_code == 200
    assert client.get(f"/v1/models/{dpo['fine_tuned_model']}:merged").status_code == 200
