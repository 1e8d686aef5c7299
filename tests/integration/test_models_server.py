"""The models an NLS job leaves behind, through a real ``sqft serve`` process and its job processes.

A tiny Llama is pruned (``/v1/finetune/sparsify``), a SparsePEFT + NLS job trains on it (the reference
README's search space, a high learning rate so that the adapter moves), its heuristic sub-adapter is
extracted and merged, and the super-adapter is merged. Then:

* ``/v1/models`` lists each of them under its OpenAI-style id, ``/v1/models/{id}`` finds each;
* an adapter answers exactly as its (sparse) merged model: the served SparsePEFT update is the masked
  one, for the super-adapter and for the sub-adapter extracted from it, in completions and in an
  evaluate job (same loss to the last bit, same greedy answers);
* ``DELETE /v1/models/{id}`` removes what it names and nothing else: the sub-adapter's merged model
  (which lives inside its directory) outlives it, and a deleted model is a 404 everywhere.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import one_thread_server

NLS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "neural_lora_search": True,
    "sparse_adapter": True,
    "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
    "search_space": ["8,6,4", "8,6,4", "8,6,4"],
}


def _ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("models-server")
    server = one_thread_server(root / "data")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            with open(write_json(root / "train.json", alpaca_records(16)), "rb") as handle:
                file_id = _ok(http.post("/v1/files", files={"file": handle}, data={"purpose": "fine-tune"}))["id"]
            sparse = _ok(http.post("/v1/finetune/sparsify", json={"model": str(tiny_model_dir), "sparsity": 0.5}))
            body = {
                "model": sparse["path"],
                "training_file": file_id,
                "Training": {"batch_size": 4, "max_train_steps": 8, "learning_rate": 5e-2},
                "General": {"lora_config": NLS, "save_strategy": "steps", "save_steps": 2},
            }
            job_id = _ok(http.post("/v1/fine_tuning/jobs", json=body))["id"]
            job = wait_until(
                lambda: (
                    (j := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j
                ),
                300,
                what="the NLS job to finish",
            )
            assert job["status"] == "succeeded", job["error"]
            extract = {"fine_tuning_job_id": job_id, "sub_adapter_version": "heuristic"}
            _ok(http.post("/v1/finetune/extract_adapter", json=extract))
            merged_sub = _ok(http.post("/v1/finetune/merge_adapter", json={**extract}))
            merged_super = _ok(http.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": job_id}))
            assert merged_sub["sparse"] is True and merged_super["sparse"] is True
            ft = job["fine_tuned_model"]
            names = {
                "base": sparse["path"],
                "super": ft,
                "super_merged": f"{ft}:merged",
                "sub": f"{ft}:heuristic",
                "sub_merged": f"{ft}:heuristic:merged",
                "ckpt2": f"{ft}:ckpt-step-2",  # checkpoints at steps 2 and 4 of 4
                "ckpt4": f"{ft}:ckpt-step-4",
            }
            yield http, names, file_id
    finally:
        server.stop()


def _listed(http: httpx.Client) -> set[str]:
    return {m["id"] for m in _ok(http.get("/v1/models"))["data"]}


def _complete(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "The sky is", "max_tokens": 12, "temperature": 0}
    return http.post("/v1/completions", json=body)


def _evaluate(http: httpx.Client, body: dict) -> list[dict]:
    """An evaluate operation's rows (asked without waiting, then polled)."""
    op_id = http.post("/v1/finetune/evaluate", json={**body, "wait": False}).json()["id"]
    op = wait_until(
        lambda: (o := http.get(f"/v1/finetune/operations/{op_id}").json())["status"] in ("succeeded", "failed") and o,
        300,
        what="the evaluation",
    )
    assert op["status"] == "succeeded", op.get("error")
    return op["result"]["data"]


def test_models_lists_sub_adapters_and_merged_models(served):
    http, names, _ = served
    assert _listed(http) == set(names.values())
    for name in names.values():
        assert _ok(http.get(f"/v1/models/{name}"))["id"] == name


def test_checkpoints_are_models_too(served):
    http, names, file_id = served
    job_id = names["super"].split(":")[3]
    listed = _ok(http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints"))["data"]
    assert {c["model"] for c in listed} == {names["ckpt2"], names["ckpt4"], names["super"]}  # the final one: the job's
    assert all(Path(c["fine_tuned_model_checkpoint"]).is_dir() for c in listed)  # still the directory
    reference = _ok(http.post("/v1/finetune/list_checkpoints", json={"fine_tuning_job_id": job_id}))
    assert {c["model"] for c in reference} == {c["model"] for c in listed}
    assert _ok(_complete(http, names["ckpt2"]))["model"] == names["ckpt2"]
    # Scored like any adapter: step 4's checkpoint is the final adapter, step 2's is not.
    candidates = [names["ckpt2"], names["ckpt4"], names["super"]]
    rows = _evaluate(http, {"candidates": candidates, "file": file_id, "max_samples": 6, "generate": False})
    step2, step4, final = (row["loss"] for row in rows)
    assert step4 == final and step2 != final
    # A sub-adapter can't take a checkpoint's name.
    resp = http.post(
        "/v1/finetune/extract_adapter", json={"fine_tuning_job_id": job_id, "sub_adapter_version": "ckpt-step-2"}
    )
    assert resp.status_code == 400 and "ckpt-step-" in resp.json()["error"]["message"], resp.text
    assert http.get(f"/v1/models/{names['super']}:ckpt-step-5").status_code == 404


def test_sparse_adapters_answer_as_their_sparse_merges(served):
    http, names, file_id = served
    texts = {key: _ok(_complete(http, name))["choices"][0]["text"] for key, name in names.items()}
    assert texts["super"] != texts["base"]  # the adapter is applied ...
    assert texts["super"] == texts["super_merged"]  # ... masked, as the sparse merge folded it in
    assert texts["sub"] == texts["sub_merged"]

    candidates = [names["sub"], names["sub_merged"], names["super"], names["super_merged"]]
    rows = _evaluate(http, {"candidates": candidates, "file": file_id, "max_samples": 6, "max_new_tokens": 6})
    sub, sub_merged, sup, sup_merged = rows
    for adapter, merged in ((sub, sub_merged), (sup, sup_merged)):
        assert adapter["loss"] == merged["loss"]
        assert [s["output"] for s in adapter["samples"]] == [s["output"] for s in merged["samples"]]


def _untar(resp: httpx.Response, into: Path) -> Path:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-tar"
    assert int(resp.headers["content-length"]) == len(resp.content)
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        tops = {name.split("/")[0] for name in tar.getnames()}
        tar.extractall(into, filter="data")
    assert len(tops) == 1  # one folder, named after the model
    return into / tops.pop()


def test_a_fine_tuned_model_downloads_whole_and_loads_with_stock_libraries(served, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    http, names, _ = served
    for key in ("sub", "super_merged"):
        where = Path(_ok(http.get(f"/v1/models/{names[key]}"))["path"])
        folder = _untar(http.get(f"/v1/models/{names[key]}/content"), tmp_path / key)
        got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        # Exactly the model's own files: the sub-adapter's merged model (inside its folder) is not part of it.
        want = {p.relative_to(where).as_posix(): p.read_bytes() for p in where.rglob("*") if p.is_file()}
        if key == "sub":
            assert any(name.startswith("merged_model/") for name in want)
            want = {name: data for name, data in want.items() if not name.startswith("merged_model/")}
        assert got == want and got
        one = http.get(f"/v1/models/{names[key]}/content", params={"file": sorted(want)[0]})
        assert one.status_code == 200 and one.content == want[sorted(want)[0]]
    base = AutoModelForCausalLM.from_pretrained(names["base"])
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "sub" / next((tmp_path / "sub").iterdir()).name))
    assert adapter.peft_config["default"].rank_pattern  # the heuristic sub-adapter's own ranks
    merged = AutoModelForCausalLM.from_pretrained(str(next((tmp_path / "super_merged").iterdir())))
    reference = AutoModelForCausalLM.from_pretrained(_ok(http.get(f"/v1/models/{names['super_merged']}"))["path"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, reference(ids).logits)


def test_downloads_name_what_is_wrong(served):
    http, names, _ = served
    for file in ("../config.json", "nope.bin", "/etc/passwd"):
        resp = http.get(f"/v1/models/{names['super_merged']}/content", params={"file": file})
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "file", resp.text
        assert "config.json" in resp.json()["error"]["message"]  # it lists what there is
    resp = http.get(f"/v1/models/{names['super']}:nope/content")
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model", resp.text
    # A base model is not the service's to hand out: its path has '/', so `<path>/content` names no model.
    resp = http.get(f"/v1/models/{names['base']}/content")
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model", resp.text


def test_delete_removes_exactly_the_named_model(served):
    http, names, _ = served
    assert _ok(http.delete(f"/v1/models/{names['sub']}")) == {"id": names["sub"], "object": "model", "deleted": True}
    # The sub-adapter's merged model lives inside its directory and is a model of its own: it stays.
    assert _listed(http) == {names[k] for k in ("base", "super", "super_merged", "sub_merged", "ckpt2", "ckpt4")}
    assert _complete(http, names["sub_merged"]).status_code == 200
    for key in ("sub_merged", "super_merged"):
        _ok(http.delete(f"/v1/models/{names[key]}"))
    assert _listed(http) == {names[k] for k in ("base", "super", "ckpt2", "ckpt4")}
    for key in ("sub", "sub_merged", "super_merged"):
        for resp in (http.get(f"/v1/models/{names[key]}"), _complete(http, names[key])):
            assert resp.status_code == 404 and resp.json()["error"]["param"] == "model", resp.text
        assert http.delete(f"/v1/models/{names[key]}").status_code == 404
    # A base model is not the caller's to delete.
    assert http.delete(f"/v1/models/{names['base']}").status_code == 403
