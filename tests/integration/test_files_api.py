"""/v1/files against the real app and a real SQLite store (in-process TestClient)."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.helpers import alpaca_records, wait_until, write_json, write_jsonl
from tests.integration.conftest import upload


def test_upload_keeps_name_size_hash_and_bytes(client, tmp_path):
    path = write_json(tmp_path / "alpaca_data.json", alpaca_records(5))
    obj = upload(client, path)
    assert obj["object"] == "file" and obj["id"].startswith("file-")
    assert obj["filename"] == "alpaca_data.json"
    assert obj["bytes"] == path.stat().st_size
    assert obj["purpose"] == "fine-tune" and obj["status"] == "processed"
    assert obj["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert obj["format"] == "alpaca" and obj["n_records"] == 5
    got = client.get(f"/v1/files/{obj['id']}")
    assert got.json()["filename"] == "alpaca_data.json"
    content = client.get(f"/v1/files/{obj['id']}/content")
    assert content.status_code == 200 and content.content == path.read_bytes()


def test_chat_jsonl_upload_is_recognised(client, tmp_path):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    obj = upload(client, write_jsonl(tmp_path / "chat.jsonl", records))
    assert obj["format"] == "chat" and obj["n_records"] == 3


def test_list_pagination_order_and_purpose(client, tmp_path):
    ids = [upload(client, write_json(tmp_path / f"f{i}.json", alpaca_records(2)))["id"] for i in range(3)]
    other = upload(client, write_json(tmp_path / "b.json", [{"x": 1}]), purpose="batch")["id"]
    desc = client.get("/v1/files").json()
    assert [f["id"] for f in desc["data"]] == [other, *reversed(ids)]
    asc = client.get("/v1/files", params={"order": "asc", "purpose": "fine-tune"}).json()
    assert [f["id"] for f in asc["data"]] == ids
    page = client.get("/v1/files", params={"limit": 2, "purpose": "fine-tune"}).json()
    assert [f["id"] for f in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    rest = client.get("/v1/files", params={"limit": 2, "purpose": "fine-tune", "after": ids[1]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_delete_removes_row_and_blob_and_leaves_others(client, tmp_path, data_dir):
    keep = upload(client, write_json(tmp_path / "keep.json", alpaca_records(2)))
    gone = upload(client, write_json(tmp_path / "gone.json", alpaca_records(2)))
    resp = client.delete(f"/v1/files/{gone['id']}")
    assert resp.json() == {"id": gone["id"], "object": "file", "deleted": True}
    assert not (data_dir / "files" / gone["id"]).exists()
    for route in (f"/v1/files/{gone['id']}", f"/v1/files/{gone['id']}/content"):
        err = client.get(route)
        assert err.status_code == 404 and err.json()["error"]["message"] == f"No such File object: {gone['id']}"
    assert client.delete(f"/v1/files/{gone['id']}").status_code == 404
    assert client.get(f"/v1/files/{keep['id']}/content").status_code == 200


def test_path_in_filename_never_escapes_the_data_dir(client, tmp_path, data_dir):
    path = write_json(tmp_path / "x.json", alpaca_records(2))
    obj = upload(client, path, filename="../../../etc/evil.json")
    assert obj["filename"] == "evil.json"
    stored = [p.name for p in (data_dir / "files").iterdir()]
    assert stored == [obj["id"]]
    assert not (tmp_path / "etc").exists() and not (data_dir.parent.parent / "etc" / "evil.json").exists()


BAD_UPLOADS = [
    ("empty", b"", "file is empty"),
    (
        "binary",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n\xff\xfe\x00\x01\n',
        "line 3",
    ),
    ("bad-jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n', "line 2: invalid JSON"),
    (
        "missing-output",
        b"".join(json.dumps(r).encode() + b"\n" for r in alpaca_records(3)) + b'{"instruction": "x"}\n',
        "line 4",
    ),
    ("no-assistant", b'{"messages": [{"role": "system", "content": "hi"}]}\n', "line 1"),
]


@pytest.mark.parametrize(("name", "payload", "needle"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_training_upload_is_rejected_with_the_line(client, tmp_path, data_dir, name, payload, needle):
    good = upload(client, write_json(tmp_path / "good.json", alpaca_records(2)))
    resp = client.post("/v1/files", files={"file": (f"{name}.jsonl", payload)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "file"
    assert needle in err["message"], err["message"]
    assert f"{name}.jsonl" in err["message"]
    # Nothing was kept, nothing else was lost, the service still answers.
    listed = client.get("/v1/files").json()["data"]
    assert [f["id"] for f in listed] == [good["id"]]
    assert [p.name for p in (data_dir / "files").iterdir()] == [good["id"]]
    assert client.get("/health").json()["status"] == "ok"


def test_unknown_purpose_is_rejected(client):
    resp = client.post("/v1/files", files={"file": ("a.json", b"[]")}, data={"purpose": "fine-tunning"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "purpose" and "fine-tunning" in resp.json()["error"]["message"]


def test_missing_file_field_names_it(client):
    resp = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "file"


def test_a_file_can_expire_and_goes_once_no_job_reads_it(client, tmp_path, data_dir, tiny_model_dir):
    path = write_json(tmp_path / "train.json", alpaca_records(16))
    with open(path, "rb") as handle:
        resp = client.post(
            "/v1/files",
            files={"file": ("train.json", handle)},
            data={"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
        )
    assert resp.status_code == 200, resp.text
    expiring = resp.json()
    assert expiring["expires_at"] == expiring["created_at"] + 3600
    kept = upload(client, path, filename="kept.json")
    assert kept["expires_at"] is None
    # Its hour is over while a job trains on it: the job keeps it until it ends.
    body = {"model": str(tiny_model_dir), "training_file": expiring["id"],
            "Training": {"epochs": 1000, "batch_size": 1, "logging_steps": 1000}}  # fmt: skip
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    client.app.state.db.execute("UPDATE files SET expires_at = 0 WHERE id = ?", (expiring["id"],))
    manager = client.app.state.job_manager
    manager._next_expiry_sweep = float("inf")  # only the calls below sweep, not the manager's loop meanwhile
    assert manager.delete_expired_files() == []
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    wait_until(lambda: client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled", 60)
    assert manager.delete_expired_files() == [expiring["id"]]
    assert client.get(f"/v1/files/{expiring['id']}").status_code == 404
    assert not (data_dir / "files" / expiring["id"]).exists()
    assert client.get(f"/v1/files/{kept['id']}").status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "expires_after"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "59"}, "expires_after"),
        ({"expires_after[seconds]": "3600"}, "expires_after"),
        ({"expiry": "1h"}, "expiry"),
    ],
)
def test_a_bad_upload_form_field_is_named(client, tmp_path, data_dir, fields, param):
    path = write_json(tmp_path / "train.json", alpaca_records(2))
    with open(path, "rb") as handle:
        resp = client.post("/v1/files", files={"file": ("t.json", handle)}, data={"purpose": "fine-tune", **fields})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert client.get("/v1/files").json()["data"] == []
    assert not [p for p in (data_dir / "files").iterdir() if p.is_file()]
