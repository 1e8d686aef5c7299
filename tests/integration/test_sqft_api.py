"""SQFT through the API: the reference README's payloads (LoRA, SparsePEFT, NLS), extract, merge, sparsify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sqft_service.adapters.qa import INT_WEIGHTS_FILE, QUANT_FILE, load_int_weights
from sqft_service.app import create_app
from sqft_service.workspace import TrainingOutputs
from tests.helpers import alpaca_records, write_json
from tests.integration.conftest import make_settings, upload, wait_status

# Section 3.2 of the reference README, verbatim apart from model and training file.
NLS_LORA_CONFIG = {
    "r": 16,
    "neural_lora_search": True,
    "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
    "search_space": ["16,12,8", "16,12,8", "16,12,8"],
}
QA_LORA_CONFIG = {
    "sparse_adapter": True,
    "quantization_aware": True,
    "lora_dropout": 0.0,
    "quantization_group_size": 16,
}
N_LAYERS = 2  # the tiny model
N_DIMS = 3 * N_LAYERS
FAST = {"Training": {"max_train_steps": 3, "batch_size": 4, "learning_rate": 1e-3}}


@pytest.fixture(scope="module")
def sqft(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[TestClient, dict]]:
    """One service for the module, with the reference's three jobs trained once."""
    tmp = tmp_path_factory.mktemp("sqft")
    with TestClient(create_app(make_settings(tmp / "data", max_concurrent_jobs=2))) as client:
        upload(client, write_json(tmp / "alpaca_data.json", alpaca_records(16)))
        sparse = client.post(
            "/v1/finetune/sparsify", json={"model": str(tiny_model_dir), "method": "wanda", "sparsity": 0.5}
        )
        assert sparse.status_code == 200, sparse.text
        sparse_dir = sparse.json()["path"]
        gptq = client.post(
            "/v1/finetune/sparsify",
            json={
                "model": str(tiny_model_dir),
                "sparsity": 0.5,
                "quantization": {"bits": 4, "group_size": QA_LORA_CONFIG["quantization_group_size"]},
            },
        )
        assert gptq.status_code == 200, gptq.text
        bodies = {
            "lora": {"training_file": "alpaca_data.json", "model": str(tiny_model_dir)},
            "sparse": {
                "training_file": "alpaca_data.json",
                "model": sparse_dir,
                "General": {"lora_config": {"sparse_adapter": True}},
            },
            "nls": {
                "training_file": "alpaca_data.json",
                "model": str(tiny_model_dir),
                "General": {"lora_config": NLS_LORA_CONFIG},
            },
            "sparse_nls": {
                "training_file": "alpaca_data.json",
                "model": sparse_dir,
                "General": {"lora_config": {**NLS_LORA_CONFIG, "sparse_adapter": True, "lora_dropout": 0.0}},
            },
            "qa": {
                "training_file": "alpaca_data.json",
                "model": sparse_dir,
                # A checkpoint per step.
                "General": {"lora_config": QA_LORA_CONFIG, "save_strategy": "steps", "save_steps": 1},
            },
            "qa_gptq": {
                "training_file": "alpaca_data.json",
                "model": gptq.json()["path"],
                "General": {"lora_config": QA_LORA_CONFIG},
            },
        }
        jobs = {}
        for name, body in bodies.items():
            resp = client.post("/v1/fine_tuning/jobs", json={**body, **FAST})
            assert resp.status_code == 200, resp.text
            jobs[name] = resp.json()["id"]
        for name, job_id in jobs.items():
            done = wait_status(client, job_id, ("succeeded", "failed"), timeout=240)
            assert done["status"] == "succeeded", (name, done["error"])
        jobs["sparse_dir"] = sparse_dir
        jobs["sparse_report"] = sparse.json()
        jobs["gptq_report"] = gptq.json()
        yield client, jobs


def _post(client, route, body):
    return client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_sparsify_reports_per_layer_sparsity(sqft):
    _, jobs = sqft
    report = jobs["sparse_report"]
    assert report["method"] == "wanda" and report["calibration"] == "builtin"
    overall = report["report"]["overall"]
    assert overall == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(jobs["sparse_dir"])
    w = model.model.layers[0].mlp.up_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_nls_job_writes_group_major_search_files(sqft):
    client, jobs = sqft
    job = client.get(f"/v1/fine_tuning/jobs/{jobs['nls']}").json()
    adapter = job["fine_tuned_model_path"]
    with open(f"{adapter}/elastic_adapter_config.json") as handle:
        elastic = json.load(handle)
    dims = elastic["dimensions"]
    assert len(dims) == N_DIMS
    assert [(d["group"], d["layer"]) for d in dims] == [(g, layer) for g in range(3) for layer in range(N_LAYERS)]
    with open(f"{adapter}/nls_stats.json") as handle:
        stats = json.load(handle)
    draws = [sum(r["draws"] for r in d["ranks"].values()) for d in stats["dimensions"]]
    assert draws == [3] * N_DIMS  # one draw per step per dimension
    events = client.get(f"/v1/fine_tuning/jobs/{jobs['nls']}/events?limit=200").json()["data"]
    assert any(e["type"] == "metrics" and "nls_stats" in (e["data"] or {}) for e in events)


def test_extract_heuristic_loads_with_stock_peft(sqft, tiny_model_dir):
    client, jobs = sqft
    resp = _post(
        client, "/v1/finetune/extract_adapter", {"fine_tuning_job_id": jobs["nls"], "sub_adapter_version": "heuristic"}
    )
    assert resp.status_code == 200, resp.text
    sub = resp.json()
    assert sub["ranks"] == [12] * N_DIMS and sub["path"].endswith("/heuristic")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, sub["path"])
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.shape[0] == 12


def test_custom_config_length_and_values_are_checked(sqft):
    client, jobs = sqft
    reference_example = [8, 8, 16, 8, 8, 12, 8, 12, 12, 12, 8, 16, 12, 16, 16, 12, 12, 8, 8, 16, 8, 8, 12, 8, 16,
                         12, 8, 16, 8, 16, 12, 8, 8, 16, 16, 16, 16, 16, 8, 12, 12, 16, 12, 16, 12, 16, 16, 12, 8, 12,
                         12, 8, 8, 12, 8, 12, 12, 8, 16, 8, 8, 8, 8, 12, 16, 16]  # fmt: skip
    assert len(reference_example) == 3 * 22  # 3 groups x 22 layers of the reference's model
    body = {"fine_tuning_job_id": jobs["nls"], "sub_adapter_version": "custom", "custom_config": reference_example}
    resp = _post(client, "/v1/finetune/extract_adapter", body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "custom_config"
    assert f"{N_DIMS}" in resp.json()["error"]["message"]
    bad_value = {**body, "custom_config": [16, 12, 8, 10, 16, 16]}
    resp = _post(client, "/v1/finetune/extract_adapter", bad_value)
    assert resp.status_code == 400 and "custom_config[3]" in resp.json()["error"]["message"]
    ok = _post(client, "/v1/finetune/extract_adapter", {**body, "custom_config": [16, 12, 8, 8, 12, 16]})
    assert ok.status_code == 200 and ok.json()["ranks"] == [16, 12, 8, 8, 12, 16]


def test_merge_sub_adapter_matches_peft(sqft, tiny_model_dir):
    client, jobs = sqft
    sub = _post(
        client, "/v1/finetune/extract_adapter", {"fine_tuning_job_id": jobs["nls"], "sub_adapter_version": "minimal"}
    ).json()
    # The reference README's merge example, including its misspelt route.
    resp = _post(
        client, "/v1/ffinetune/merge_adapter", {"fine_tuning_job_id": jobs["nls"], "sub_adapter_version": "minimal"}
    )
    assert resp.status_code == 200, resp.text
    merged_dir = resp.json()["path"]
    assert merged_dir.endswith("/minimal/merged_model")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sub["path"]).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)


def test_sparse_jobs_merge_keeps_every_zero(sqft):
    client, jobs = sqft
    base = AutoModelForCausalLM.from_pretrained(jobs["sparse_dir"]).state_dict()
    for name in ("sparse", "sparse_nls"):
        resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs[name]})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["sparse"] is True and out["zeros_preserved"] is True
        assert out["sparsity"]["after"]["overall"] == pytest.approx(out["sparsity"]["before"]["overall"])
        merged = AutoModelForCausalLM.from_pretrained(out["path"]).state_dict()
        changed = 0
        for key, weight in base.items():
            if "layers" in key and key.endswith("proj.weight"):
                assert torch.equal(merged[key][weight == 0], weight[weight == 0]), key
                changed += int(not torch.equal(merged[key], weight))
        assert changed > 0  # the adapter did change the non-zeros


def test_qa_sparse_job_merges_into_the_integers_it_trained_with(sqft):
    client, jobs = sqft
    job = client.get(f"/v1/fine_tuning/jobs/{jobs['qa']}").json()
    quantizers = Path(job["fine_tuned_model_path"]) / QUANT_FILE
    assert quantizers.is_file()
    # Written once and linked into each checkpoint: the quantizers never change during training.
    saved = [c / QUANT_FILE for c in TrainingOutputs(quantizers.parent.parent).checkpoints.iterdir()]
    assert len(saved) == 3 and all(p.stat().st_ino == quantizers.stat().st_ino for p in saved)
    resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs["qa"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["sparse"] is True and out["zeros_preserved"] is True and out["dtype"] == "float32"
    assert out["quantization"] == {"bits": 4, "group_size": 16, "layers": 7 * N_LAYERS, "int_weights": INT_WEIGHTS_FILE}
    base = AutoModelForCausalLM.from_pretrained(jobs["sparse_dir"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out["path"]).state_dict()  # stock transformers
    ints = load_int_weights(out["path"])
    assert len(ints) == 7 * N_LAYERS
    for name, weight in ints.items():
        key = f"{name}.weight"
        assert torch.equal(weight, merged[key]), key  # the INT file is the model
        assert (weight[base[key] == 0] == 0).all(), key  # as sparse as the base
    # The fine-tuned model (served through its adapter) and the merged INT model score alike, to the bit.
    scored = client.post(
        "/v1/finetune/evaluate",
        json={"candidates": [job["fine_tuned_model"], out["path"]], "file": job["training_file"], "generate": False},
    )
    assert scored.status_code == 200, scored.text
    adapter_row, merged_row = scored.json()["data"]
    assert adapter_row["loss"] == merged_row["loss"] and adapter_row["n_label_tokens"] == merged_row["n_label_tokens"]


def test_qa_on_a_gptq_base_serves_and_merges_to_the_same_int_model(sqft):
    client, jobs = sqft
    report = jobs["gptq_report"]
    quantization = report["quantization"]
    assert quantization["method"] == "gptq" and quantization["layers"] == 7 * N_LAYERS
    assert report["calibration"] == "builtin" and quantization["output_error"] < quantization["rtn_output_error"]
    (op,) = [
        o
        for o in client.get("/v1/finetune/operations?kind=sparsify").json()["data"]
        if o["result"]["path"] == report["path"]
    ]
    events = client.get(f"/v1/finetune/operations/{op['id']}/events").json()["data"]
    assert any(f"GPTQ INT4: {N_LAYERS}/{N_LAYERS}" in e["message"] for e in events)
    job = client.get(f"/v1/fine_tuning/jobs/{jobs['qa_gptq']}").json()
    resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs["qa_gptq"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["zeros_preserved"] is True
    assert out["quantization"] == {
        "bits": 4,
        "group_size": 16,
        "layers": 7 * N_LAYERS,
        "base": "gptq",
        "int_weights": INT_WEIGHTS_FILE,
    }
    scored = client.post(
        "/v1/finetune/evaluate",
        json={
            "candidates": [report["path"], job["fine_tuned_model"], out["path"]],
            "file": job["training_file"],
            "generate": False,
        },
    )
    assert scored.status_code == 200, scored.text
    base_row, adapter_row, merged_row = scored.json()["data"]
    # Served through its adapter (on W~) and merged, the fine-tune is one model, to the bit; and it trained.
    assert adapter_row["loss"] == merged_row["loss"] and adapter_row["loss"] < base_row["loss"]
    # The unit tests check a QA job's bits and group size against the base's (tests/unit/test_gptq.py).
    refused = _post(
        client, "/v1/finetune/sparsify", {"model": report["source_model"], "quantization": {"group_size": 24}}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "quantization.group_size", refused.text


def test_qa_settings_are_checked_by_the_api(sqft):
    client, jobs = sqft
    for lora, named in (
        ({"quantization_aware": True}, "sparse_adapter"),
        ({"quantization_bits": 8}, "quantization_bits"),
    ):
        body = {"training_file": "alpaca_data.json", "model": jobs["sparse_dir"], "General": {"lora_config": lora}}
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "General.lora_config" and named in error["message"], error


def test_gguf_export_of_a_merge_on_a_model_directory(sqft):
    """The QA job's base is a plain model directory (the Wanda-pruned tiny Llama): its GGUF export takes
    the settings and tokenizer from that directory's config.json and tokenizer.json, and stock
    transformers reads it back as the merged model, the QA layers' integers included."""
    client, jobs = sqft
    resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs["qa"], "gguf": "f32"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    exported = out["gguf"]
    # Groups of 16 fit no GGML block: the QA layers go as exact floats (rows in llama.cpp's order).
    assert exported["int_layers"] == exported["exact_int_layers"] == 7 * N_LAYERS
    path = Path(exported["path"])
    assert path.parent == Path(out["path"]) and exported["tensor_types"] == {"F32": 3 + 9 * N_LAYERS}
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["llama.block_count"].contents() == N_LAYERS
    merged = AutoModelForCausalLM.from_pretrained(out["path"], dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = from_gguf.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in merged.state_dict().items())


def test_gguf_export_refuses_types_it_does_not_write(sqft):
    client, jobs = sqft
    before = client.get("/v1/finetune/operations", params={"kind": "merge"}).json()["data"]
    resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs["qa"], "gguf": "q4_k"})
    assert resp.status_code == 400 and "gguf" in resp.text, resp.text
    # Nothing was queued.
    assert client.get("/v1/finetune/operations", params={"kind": "merge"}).json()["data"] == before


def test_merge_plain_lora_job(sqft):
    client, jobs = sqft
    resp = _post(client, "/v1/finetune/merge_adapter", {"fine_tuning_job_id": jobs["lora"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"].endswith("/output/merged_model") and resp.json()["sparse"] is False


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"fine_tuning_job_id": "ftjob-nope"}, 404, "No such fine-tuning job"),
        ({"sub_adapter_version": "../../etc"}, 400, "not a valid name"),
        ({"sub_adapter_version": "a/b"}, 400, "not a valid name"),
        ({"sub_adapter_version": "custom"}, 400, "custom_config"),
    ],
)
def test_extract_errors(sqft, body, status, needle):
    client, jobs = sqft
    resp = _post(client, "/v1/finetune/extract_adapter", {"fine_tuning_job_id": jobs["nls"], **body})
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]["message"]


def test_extract_needs_nls_and_success(sqft, tiny_model_dir):
    client, jobs = sqft
    resp = _post(client, "/v1/finetune/extract_adapter", {"fine_tuning_job_id": jobs["lora"]})
    assert resp.status_code == 400 and "neural_lora_search" in resp.json()["error"]["message"]
    pending = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "training_file": "alpaca_data.json",
            "model": str(tiny_model_dir),
            "Training": {"epochs": 500},
            "General": {"lora_config": NLS_LORA_CONFIG},
        },
    ).json()
    resp = _post(client, "/v1/finetune/extract_adapter", {"fine_tuning_job_id": pending["id"]})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_not_succeeded"
    client.post(f"/v1/fine_tuning/jobs/{pending['id']}/cancel")


def test_unknown_module_in_groups_fails_the_job_naming_it(sqft, tiny_model_dir):
    client, _ = sqft
    lora = {**NLS_LORA_CONFIG, "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["dwn_proj"]]}
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"training_file": "alpaca_data.json", "model": str(tiny_model_dir), "General": {"lora_config": lora}},
    ).json()
    done = wait_status(client, job["id"], ("failed", "succeeded"))
    assert done["status"] == "failed"
    assert "dwn_proj" in done["error"]["message"]
    assert done["error"]["param"] == "General.lora_config.target_module_groups"
