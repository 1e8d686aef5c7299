"""OpenAI's Uploads API (``/v1/uploads``): a file sent in parts, joined in the listed order, checked like
``POST /v1/files``; a failed completion keeps every part, an ended upload takes nothing more."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import alpaca_records, write_json
from tests.integration.conftest import make_settings


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _create(client, data: bytes, purpose: str = "fine-tune", **extra) -> dict:
    body = {"filename": "train.jsonl", "purpose": purpose, "bytes": len(data), "mime_type": "application/jsonl"}
    resp = client.post("/v1/uploads", json={**body, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _part(client, upload_id: str, data: bytes):
    return client.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data)})


def _parts(client, upload_id: str, pieces: list[bytes]) -> list[str]:
    ids = []
    for piece in pieces:
        resp = _part(client, upload_id, piece)
        assert resp.status_code == 200, resp.text
        assert resp.json()["object"] == "upload.part" and resp.json()["upload_id"] == upload_id
        assert resp.json()["id"].startswith("part_")
        ids.append(resp.json()["id"])
    return ids


def _parts_dir(data_dir: Path, upload_id: str) -> Path:
    return data_dir / "uploads" / upload_id


def _complete(client, upload_id: str, part_ids: list[str], **extra):
    return client.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": part_ids, **extra})


def test_parts_are_joined_in_the_listed_order_into_a_checked_file(client, data_dir):
    data = _jsonl([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)])
    third = len(data) // 3
    pieces = [data[:third], data[third : 2 * third], data[2 * third :]]
    upload = _create(client, data)
    assert upload["object"] == "upload" and upload["status"] == "pending" and upload["file"] is None
    assert upload["id"].startswith("upload_")  # OpenAI's prefixes
    assert upload["expires_at"] - upload["created_at"] == 3600
    # Sent last piece first: the order that counts is the one listed at completion.
    ids = _parts(client, upload["id"], pieces[::-1])[::-1]
    resp = _complete(client, upload["id"], ids, md5=hashlib.md5(data).hexdigest())
    assert resp.status_code == 200, resp.text
    done = resp.json()
    assert done["status"] == "completed" and done["bytes"] == len(data)
    file = done["file"]
    assert file["filename"] == "train.jsonl" and file["bytes"] == len(data) and file["purpose"] == "fine-tune"
    assert file["sha256"] == hashlib.sha256(data).hexdigest()
    assert file["format"] == "alpaca" and file["n_records"] == 40
    assert client.get(f"/v1/files/{file['id']}/content").content == data
    assert not _parts_dir(data_dir, upload["id"]).exists()  # the parts are gone once joined
    # An ended upload takes no more parts and no second completion.
    again = _part(client, upload["id"], b"x")
    assert again.status_code == 409 and again.json()["error"]["code"] == "upload_completed"
    assert _complete(client, upload["id"], ids).status_code == 409


def test_a_failed_completion_keeps_the_upload_and_every_part(client, data_dir):
    good = _jsonl(alpaca_records(6))
    data = good + b'{"instruction": "broken"\n'
    upload = _create(client, data)
    ids = _parts(client, upload["id"], [data[:50], data[50:]])

    wrong_total = _complete(client, upload["id"], ids[:1])
    assert wrong_total.status_code == 400 and wrong_total.json()["error"]["param"] == "part_ids"
    assert f"created for {len(data)}" in wrong_total.json()["error"]["message"]
    twice = _complete(client, upload["id"], [ids[0], ids[0]])
    assert twice.status_code == 400 and "part_ids[1]" in twice.json()["error"]["message"]
    unknown = _complete(client, upload["id"], [ids[0], "part-nope"])
    assert unknown.status_code == 400 and "not a part of this upload" in unknown.json()["error"]["message"]
    bad_md5 = _complete(client, upload["id"], ids, md5="0" * 32)
    assert bad_md5.status_code == 400 and bad_md5.json()["error"]["param"] == "md5"
    # The joined file is checked like an upload to /v1/files: its bad line is named, nothing is kept.
    invalid = _complete(client, upload["id"], ids)
    assert invalid.status_code == 400, invalid.text
    assert "line 7" in invalid.json()["error"]["message"]
    assert client.get("/v1/files").json()["data"] == []
    assert sorted(p.name for p in _parts_dir(data_dir, upload["id"]).iterdir()) == sorted(ids)
    assert not list((data_dir / "files").glob(".staging-*"))

    cancelled = client.post(f"/v1/uploads/{upload['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert not _parts_dir(data_dir, upload["id"]).exists()
    assert client.post(f"/v1/uploads/{upload['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    late = _part(client, upload["id"], b"x")
    assert late.status_code == 409 and late.json()["error"]["code"] == "upload_cancelled"


def test_a_part_past_the_declared_bytes_is_refused_and_not_kept(client, data_dir):
    data = _jsonl(alpaca_records(4))
    upload = _create(client, data)
    first = _parts(client, upload["id"], [data[:-10]])
    over = _part(client, upload["id"], data[-10:] + b"extra")
    assert over.status_code == 413 and over.json()["error"]["param"] == "data"
    empty = _part(client, upload["id"], b"")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "data"
    assert [p.name for p in _parts_dir(data_dir, upload["id"]).iterdir()] == first
    rest = _parts(client, upload["id"], [data[-10:]])
    assert _complete(client, upload["id"], first + rest).status_code == 200


@pytest.mark.parametrize(
    ("change", "param", "status"),
    [
        ({"purpose": "fine-tune-results"}, "purpose", 400),
        ({"bytes": 0}, "bytes", 400),
        ({"bytes": 10**12}, "bytes", 413),
        ({"filename": "../.."}, "filename", 400),
        ({"expires_after": {"anchor": "last_active_at", "seconds": 3600}}, "expires_after.anchor", 400),
        ({"expires_after": {"anchor": "created_at", "seconds": 60}}, "expires_after.seconds", 400),
        ({"colour": "red"}, "colour", 400),
    ],
)
def test_a_bad_create_names_its_field(client, change, param, status):
    body = {"filename": "a.jsonl", "purpose": "fine-tune", "bytes": 10, "mime_type": "application/jsonl", **change}
    resp = client.post("/v1/uploads", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_pending_uploads_per_project_are_bounded(client):
    for _ in range(16):
        _create(client, b"0123456789")
    resp = client.post(
        "/v1/uploads", json={"filename": "a.jsonl", "purpose": "batch", "bytes": 10, "mime_type": "text/plain"}
    )
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "quota_exceeded"


def test_an_upload_expires_an_hour_after_it_was_made(client, data_dir):
    upload = _create(client, b"0123456789", purpose="batch")
    _parts(client, upload["id"], [b"01234"])
    client.app.state.upload_service.store.db.execute("UPDATE uploads SET expires_at = expires_at - 3600")
    resp = _part(client, upload["id"], b"56789")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "upload_expired"
    assert not _parts_dir(data_dir, upload["id"]).exists()


def test_the_file_limit_bounds_an_upload_and_its_parts(data_dir):
    with TestClient(create_app(make_settings(data_dir, max_upload_bytes=1000))) as client:
        body = {"filename": "a.txt", "purpose": "batch", "bytes": 1001, "mime_type": "text/plain"}
        over = client.post("/v1/uploads", json=body)
        assert over.status_code == 413 and over.json()["error"]["param"] == "bytes"
        upload = _create(client, b"x" * 1000, purpose="batch")
        big = b"x" * (200 * 1024)  # over the 1000-byte limit and the form overhead: refused by its length
        resp = _part(client, upload["id"], big)
        assert resp.status_code == 413 and resp.json()["error"]["param"] == "data"
        assert "the part is" in resp.json()["error"]["message"]


def test_other_projects_uploads_are_not_found(data_dir):
    with TestClient(create_app(make_settings(data_dir, api_key="alice:key-alice,bob:key-bob"))) as client:
        alice, bob = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
        body = {"filename": "a.txt", "purpose": "batch", "bytes": 3, "mime_type": "text/plain"}
        upload = client.post("/v1/uploads", json=body, headers=alice).json()
        resp = client.post(f"/v1/uploads/{upload['id']}/parts", files={"data": ("b", b"abc")}, headers=bob)
        assert resp.status_code == 404
        assert client.post(f"/v1/uploads/{upload['id']}/cancel", headers=bob).status_code == 404
        part = client.post(f"/v1/uploads/{upload['id']}/parts", files={"data": ("b", b"abc")}, headers=alice)
        assert part.status_code == 200
        done = client.post(
            f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part.json()["id"]]}, headers=alice
        )
        assert done.status_code == 200
        file_id = done.json()["file"]["id"]
        assert client.get(f"/v1/files/{file_id}", headers=bob).status_code == 404
        assert client.get(f"/v1/files/{file_id}", headers=alice).status_code == 200


def test_a_restart_during_a_completion_leaves_the_upload_pending(data_dir):
    data = _jsonl(alpaca_records(3))
    with TestClient(create_app(make_settings(data_dir))) as client:
        upload = _create(client, data)
        ids = _parts(client, upload["id"], [data])
        client.app.state.upload_service.store.move(upload["id"], "pending", "completing")
        assert _complete(client, upload["id"], ids).status_code == 409  # a completion is under way
        stale = _create(client, b"0123456789", purpose="batch")
        _parts(client, stale["id"], [b"01234"])
        client.app.state.upload_service.store.db.execute(
            "UPDATE uploads SET expires_at = 0 WHERE id = ?", (stale["id"],)
        )
    stray = data_dir / "uploads" / ".staging-cut-off"
    stray.write_bytes(b"half a part")
    with TestClient(create_app(make_settings(data_dir))) as client:
        assert not stray.exists()
        assert not _parts_dir(data_dir, stale["id"]).exists()  # its hour ran out while the service was down
        late = client.post(f"/v1/uploads/{stale['id']}/cancel")
        assert late.status_code == 409 and late.json()["error"]["code"] == "upload_expired"
        done = _complete(client, upload["id"], ids)
        assert done.status_code == 200 and done.json()["file"]["n_records"] == 3


def test_the_openai_sdk_uploads_a_file_in_parts(sdk, tmp_path):
    path = write_json(tmp_path / "train.json", alpaca_records(200))
    data = path.read_bytes()
    upload = sdk.uploads.upload_file_chunked(
        file=path, mime_type="application/json", purpose="fine-tune", part_size=len(data) // 4 + 1,
        md5=hashlib.md5(data).hexdigest(),
    )  # fmt: skip
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.bytes == len(data) and upload.file.filename == "train.json"
    assert sdk.files.content(upload.file.id).read() == data
    listed = sdk.files.retrieve(upload.file.id)
    assert listed.purpose == "fine-tune" and listed.status == "processed" and listed.expires_at is None
    # OpenAI's expiry, on an upload in parts and on a plain upload (the SDK sends it as form fields).
    parted = sdk.uploads.create(
        bytes=len(data), filename="t.json", mime_type="application/json", purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )  # fmt: skip
    part = sdk.uploads.parts.create(parted.id, data=data)
    made = sdk.uploads.complete(parted.id, part_ids=[part.id]).file
    assert made is not None and made.expires_at == made.created_at + 7200
    plain = sdk.files.create(
        file=("b.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert plain.expires_at == plain.created_at + 3600
