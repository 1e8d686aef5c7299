"""No code execution or file access by request: model roots, Hub ids, remote code, pickles, names.

The real app and real job processes on the tiny model; each test reproduces one finding and shows
the refusal (or, where the operator allows it, the acceptance).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.settings import Settings
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import make_settings, upload, wait_status

JOBS = "/v1/fine_tuning/jobs"
FAST = {"Training": {"max_train_steps": 1, "batch_size": 2}}


def job_body(model: str, train_file: dict, **extra) -> dict:
    return {"model": model, "training_file": train_file["id"], **FAST, **extra}


def refused(resp, param: str, code: str | None) -> str:
    """Assert a 400 naming ``param`` with ``code``; return its message."""
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    return err["message"]


def wait_operation(client: TestClient, op_id: str) -> dict:
    def ended():
        op = client.get(f"/v1/finetune/operations/{op_id}").json()
        return op if op["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(ended, 120, what=f"operation {op_id} to end")


# ------------------------------------------------------------------ model roots
OUTSIDE = ["/etc/passwd", "/etc/no-such-file-sqft", "/tmp/a\x00b"]


def test_paths_outside_the_roots_get_one_message_whether_or_not_they_exist(client, train_file, tmp_path):
    (tmp_path / "etc-link").symlink_to("/etc")  # inside the roots by name, outside once resolved
    refs = [*OUTSIDE, f"{tmp_path}/etc-link/passwd", str(tmp_path) + "/.." * 12 + "/etc/passwd"]
    messages = {
        refused(client.post(JOBS, json=job_body(ref, train_file)), "model", "model_not_allowed") for ref in refs
    }
    assert len(messages) == 1, messages  # nothing tells an existing file from a missing one
    (message,) = messages
    assert "model roots" in message and "passwd" not in message and "exist" not in message
    assert "not found" not in message
    sparsify = client.post("/v1/finetune/sparsify", json={"model": "/etc/passwd"})
    assert refused(sparsify, "model", "model_not_allowed") == message
    assert client.get(JOBS).json()["data"] == []
    assert client.get("/v1/finetune/operations").json()["data"] == []


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": None, "General": {"base_model": "/etc/passwd"}}, "General.base_model"),
        ({"General": {"tokenizer_name": "/etc/passwd"}}, "General.tokenizer_name"),
    ],
)
def test_every_model_field_is_confined(client, train_file, tiny_model_dir, patch, param):
    body = {**job_body(str(tiny_model_dir), train_file), **patch}
    refused(client.post(JOBS, json={k: v for k, v in body.items() if v is not None}), param, "model_not_allowed")


def test_a_missing_path_inside_the_roots_is_not_found(client, train_file, tmp_path, tiny_model_dir):
    body = job_body(str(tiny_model_dir), train_file, General={"tokenizer_name": str(tmp_path / "no-tokenizer")})
    message = refused(client.post(JOBS, json=body), "General.tokenizer_name", "model_not_found")
    assert "not found" in message


def test_the_job_process_checks_again_and_loads_what_it_checked(tmp_path, tiny_model_dir):
    """A symlink that pointed inside the roots at request time and outside when the job runs."""
    roots = tmp_path / "roots"
    shutil.copytree(tiny_model_dir, roots / "real")
    shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "m")
    link = roots / "m"
    link.symlink_to(roots / "real")
    settings = make_settings(tmp_path / "data", model_roots=(roots,))
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/finetune/sparsify", json={"model": str(link), "output_name": "swap", "wait": False})
        assert resp.status_code == 202, resp.text
        # The job process needs seconds to import torch before it loads anything; swap now.
        (roots / ".m.new").symlink_to(tmp_path / "elsewhere" / "m")
        os.replace(roots / ".m.new", link)
        op = wait_operation(client, resp.json()["id"])
    assert op["status"] == "failed", op
    assert (op["error"]["code"], op["error"]["param"]) == ("model_not_allowed", "model")
    assert not (settings.model_cache_dir / "sparse" / "swap").exists()


# --------------------------------------------------------------------- Hub ids
@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M", "gpt2"])
def test_hub_ids_are_refused_at_once_unless_allowed(client, train_file, hub_id):
    start = time.monotonic()
    message = refused(client.post(JOBS, json=job_body(hub_id, train_file)), "model", "model_not_allowed")
    assert time.monotonic() - start < 5  # not a 30-50 s download retry
    assert "SQFT_ALLOW_HUB" in message and "Hub id" in message
    refused(client.post("/v1/finetune/sparsify", json={"model": hub_id}), "model", "model_not_allowed")


def test_hub_ids_are_accepted_when_the_operator_allows_them(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "hub-data", allow_hub=True))) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(4)))
        resp = client.post(JOBS, json={"model": "HuggingFaceTB/SmolLM2-135M", "training_file": f["id"]})
        assert resp.status_code == 200, resp.text
        client.post(f"{JOBS}/{resp.json()['id']}/cancel")


# ----------------------------------------------------------------- remote code
def model_with_remote_code(tiny_model_dir: Path, where: Path, marker: Path) -> Path:
    """The tiny model, whose config.json maps its classes to a module that leaves ``marker`` when imported."""
    shutil.copytree(tiny_model_dir, where)
    config = json.loads((where / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "payload.Config", "AutoModelForCausalLM": "payload.Model"}
    (where / "config.json").write_text(json.dumps(config))
    (where / "payload.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return where


REMOTE = {"General": {"config": {"trust_remote_code": True}}}


def test_trust_remote_code_is_refused_unless_the_operator_allows_it(
    client, train_file, tmp_path, tiny_model_dir, monkeypatch
):
    marker = tmp_path / "remote-code-ran"
    model = model_with_remote_code(tiny_model_dir, tmp_path / "remote", marker)
    message = refused(
        client.post(JOBS, json=job_body(str(model), train_file, **REMOTE)),
        "General.config.trust_remote_code",
        "remote_code_not_allowed",
    )
    assert "SQFT_ALLOW_REMOTE_CODE" in message
    assert client.get(JOBS).json()["data"] == [] and not marker.exists()

    # Allowed, the same request runs the model's code in the job process (that is what the option means).
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    with TestClient(create_app(make_settings(tmp_path / "data2", allow_remote_code=True))) as allowed:
        f = upload(allowed, write_json(tmp_path / "t.json", alpaca_records(4)))
        job = allowed.post(JOBS, json={"model": str(model), "training_file": f["id"], **FAST, **REMOTE})
        assert job.status_code == 200, job.text
        wait_status(allowed, job.json()["id"], ("succeeded", "failed"))
    assert marker.exists()


def test_settings_read_booleans_and_roots_from_the_environment():
    env = {"SQFT_ALLOW_REMOTE_CODE": "1", "SQFT_ALLOW_HUB": "no", "SQFT_MODEL_ROOTS": f"/a{os.pathsep}/b"}
    settings = Settings.from_env(env)
    assert settings.allow_remote_code is True and settings.allow_hub is False
    assert settings.model_roots == (Path("/a"), Path("/b"))
    assert Settings.from_env({"SQFT_ALLOW_HUB": "TRUE"}).allow_hub is True
    with pytest.raises(SystemExit, match="SQFT_ALLOW_HUB"):
        Settings.from_env({"SQFT_ALLOW_HUB": "maybe"})


# ------------------------------------------------------------------- pickles
class _Touch:
    """Unpickling this calls Path.touch(marker): evidence that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickled_checkpoint_is_never_loaded(client, tmp_path, tiny_model_dir):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    resp = client.post("/v1/finetune/sparsify", json={"model": str(model), "output_name": "pickled", "wait": False})
    assert resp.status_code == 202, resp.text
    op = wait_operation(client, resp.json()["id"])
    assert op["status"] == "failed" and op["error"]["code"] == "invalid_model", op
    assert "safetensors" in op["error"]["message"] and not marker.exists()


# ------------------------------------------------------------ request fields
@pytest.mark.parametrize(
    ("field", "instead"), [("train_file", "training_file"), ("validation_file", "validation_file")]
)
def test_dataset_file_paths_are_refused(client, train_file, tiny_model_dir, field, instead):
    body = job_body(str(tiny_model_dir), train_file, Dataset={field: "/etc/passwd"})
    message = refused(client.post(JOBS, json=body), f"Dataset.{field}", None)
    assert f"`{instead}`" in message
    assert client.get(JOBS).json()["data"] == []


@pytest.mark.parametrize("field", ["adapter_version", "sub_adapter_version"])
def test_merge_names_the_version_field_the_client_sent(client, field):
    resp = client.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": "ftjob-x", field: "../x"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field and "not a valid name" in resp.json()["error"]["message"]


@pytest.mark.parametrize("name", ["checkpoints", "adapter", "merged_model", "Adapter", "metrics"])
def test_extract_refuses_names_of_the_job_output_layout(client, name):
    body = {"fine_tuning_job_id": "ftjob-x", "sub_adapter_version": name}
    resp = client.post("/v1/finetune/extract_adapter", json=body)
    if name == "metrics":  # a free name: it gets as far as looking the job up
        assert resp.status_code == 404, resp.text
        return
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "sub_adapter_version" and "reserved" in err["message"]
