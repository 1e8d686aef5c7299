"""/v1/responses (OpenAI's Responses API, text): the real app and engine on a tiny random Llama; every
answer compared with the chat completion of the same turns, which it must equal."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.settings import Settings
from tests.helpers import CHAT, output_text, wait_until, write_jsonl
from tests.integration.conftest import fine_tune_briefly, make_settings, wait_status

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
GREEDY = {"temperature": 0, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """The app with two projects; Alice fine-tuned the tiny model on chat records (so she may use it
    and its base)."""
    root = tmp_path_factory.mktemp("responses")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb", inference_threads=1)
    with TestClient(create_app(settings), headers=ALICE) as client:
        with open(write_jsonl(root / "c.jsonl", [CHAT] * 8), "rb") as handle:
            uploaded = client.post("/v1/files", files={"file": ("c.jsonl", handle)}, data={"purpose": "fine-tune"})
        body = {
            "model": str(tiny_model_dir),
            "training_file": uploaded.json()["id"],
            "Training": {"batch_size": 4, "epochs": 1, "learning_rate": 5e-2},
        }
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        yield client, done["fine_tuned_model"]


def _respond(client, **body) -> dict:
    resp = client.post("/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _continued(client, model: str, previous: dict, asked: str, question: str) -> dict:
    """A response to ``question`` continuing ``previous`` (the answer to ``asked``): the chat answer to the
    same turns, which it must equal."""
    answer = _respond(client, model=model, input=question, previous_response_id=previous["id"], **GREEDY)
    turns = [
        {"role": "user", "content": asked},
        {"role": "assistant", "content": output_text(previous)},
        {"role": "user", "content": question},
    ]
    assert output_text(answer) == _chat(client, model, turns)["choices"][0]["message"]["content"]
    return answer


def _events_of(resp) -> list[dict]:
    """A Responses SSE answer's events, each checked to be named as its data's type."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    events = []
    for block in resp.text.split("\n\n"):
        if block.strip() and not block.startswith(":"):
            kind, data = block.split("\n", 1)
            event = json.loads(data.removeprefix("data: "))
            assert kind == f"event: {event['type']}"
            events.append(event)
    return events


def _chat(client, model: str, messages: list[dict], max_tokens: int = 8) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_response_is_the_chat_answer_and_continues_a_stored_conversation(served):
    client, model = served
    first = _respond(client, model=model, input="Name a colour.", instructions="Answer in one word.", **GREEDY)
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    chat = _chat(client, model, messages)
    assert first["object"] == "response" and first["id"].startswith("resp_") and first["model"] == model
    (item,) = first["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")
    assert output_text(first) == chat["choices"][0]["message"]["content"]
    assert first["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert first["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    finished = chat["choices"][0]["finish_reason"] == "stop"
    assert first["status"] == ("completed" if finished else "incomplete")
    if not finished:
        assert first["incomplete_details"] == {"reason": "max_output_tokens"} and item["status"] == "incomplete"

    # Stored: retrieved as answered; a next response continues its turns (its instructions not carried).
    assert client.get(f"/v1/responses/{first['id']}").json() == first
    second = _continued(client, model, first, "Name a colour.", "And another?")
    assert second["previous_response_id"] == first["id"]
    # Message lists as input, parts included, equal the same turns as one string each.
    parts = [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Name a "}, {"type": "input_text", "text": "colour."}],
        }
    ]
    assert output_text(_respond(client, model=model, input=parts, **GREEDY)) == output_text(
        _respond(client, model=model, input="Name a colour.", **GREEDY)
    )

    # Its own input items (not the earlier response's), newest first by default, paged by `after`.
    many = [{"role": "user", "content": f"Turn {i}."} for i in range(3)]
    listed = _respond(client, model=model, input=many, **GREEDY)
    items = client.get(f"/v1/responses/{listed['id']}/input_items").json()
    assert items["object"] == "list" and not items["has_more"]
    assert [i["content"][0]["text"] for i in items["data"]] == ["Turn 2.", "Turn 1.", "Turn 0."]
    assert all(i["id"].startswith("msg_") and i["type"] == "message" and i["role"] == "user" for i in items["data"])
    page = client.get(f"/v1/responses/{listed['id']}/input_items", params={"order": "asc", "limit": 1}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["Turn 0."] and page["has_more"]
    rest = client.get(
        f"/v1/responses/{listed['id']}/input_items", params={"order": "asc", "after": page["last_id"]}
    ).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["Turn 1.", "Turn 2."]
    second_items = client.get(f"/v1/responses/{second['id']}/input_items").json()["data"]
    assert [i["content"][0]["text"] for i in second_items] == ["And another?"]

    # Another project sees none of it; deleted is gone; not stored is never found.
    assert client.get(f"/v1/responses/{first['id']}", headers=BOB).status_code == 404
    other = client.post("/v1/responses", json={"model": model, "input": "x"}, headers=BOB)
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"
    deleted = client.delete(f"/v1/responses/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "response.deleted", "deleted": True}
    assert client.get(f"/v1/responses/{first['id']}").status_code == 404
    gone = client.post("/v1/responses", json={"model": model, "input": "x", "previous_response_id": first["id"]})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "previous_response_id"
    unsaved = _respond(client, model=model, input="x", store=False, **GREEDY)
    assert unsaved["store"] is False and client.get(f"/v1/responses/{unsaved['id']}").status_code == 404


def test_a_streamed_response_sends_openai_events_and_the_same_text(served):
    client, model = served
    whole = _respond(client, model=model, input="Repeat the word red.", **GREEDY)
    resp = client.post(
        "/v1/responses", json={"model": model, "input": "Repeat the word red.", "stream": True, **GREEDY}
    )
    events = _events_of(resp)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole['status']}",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == output_text(whole) == events[-4]["text"]
    final = events[-1]["response"]
    assert output_text(final) == text and final["usage"] == whole["usage"]
    assert client.get(f"/v1/responses/{final['id']}").json()["output"] == final["output"]  # stored when done


def test_log_probabilities_are_chats_in_the_text_part_and_its_stream_deltas(served):
    client, model = served
    ask = {"model": model, "input": "Name a colour.", **GREEDY}
    scored = _respond(client, **ask, include=["message.output_text.logprobs"], top_logprobs=2)
    (part,) = scored["output"][0]["content"]
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()["choices"][0]
    assert part["text"] == chat["message"]["content"] and part["logprobs"] == chat["logprobs"]["content"]
    assert "".join(t["token"] for t in part["logprobs"]) == part["text"] and scored["top_logprobs"] == 2
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in part["logprobs"])
    assert "logprobs" not in _respond(client, **ask)["output"][0]["content"][0]  # not asked: not scored
    alone = _respond(client, **ask, top_logprobs=0)["output"][0]["content"][0]  # `top_logprobs` asks too
    assert [t["token"] for t in alone["logprobs"]] == [t["token"] for t in part["logprobs"]]
    assert all(t["top_logprobs"] == [] for t in alone["logprobs"])
    # Streamed: each delta carries its tokens' scores, the text done all of them; stored with the answer.
    events = _events_of(client.post("/v1/responses", json={**ask, "stream": True, "top_logprobs": 2}))
    deltas = [t for e in events if e["type"] == "response.output_text.delta" for t in e["logprobs"]]
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert deltas == done["logprobs"] == part["logprobs"]
    final = events[-1]["response"]
    assert client.get(f"/v1/responses/{final['id']}").json()["output"][0]["content"][0]["logprobs"] == deltas
    # Refused, naming the field: what the service cannot include, and scores beside calls.
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    for extra, param in (
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 1, "tools": [tool]}, "include"),
    ):
        resp = client.post("/v1/responses", json={**ask, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"].startswith(param), resp.text


def test_text_format_and_refused_fields(served):
    client, model = served
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["colour", "sure"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}}
    answer = json.loads(
        output_text(_respond(client, model=model, input="Pick one.", text=fmt, temperature=0, max_output_tokens=32))
    )
    assert answer["colour"] in ("red", "blue") and isinstance(answer["sure"], bool)

    cases = [
        ({"tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400, "text"),
        ({"max_output_tokens": 100000}, 400, "max_output_tokens"),
        ({"input": []}, 400, "input"),
        ({"previous_response_id": "resp_missing"}, 404, "previous_response_id"),
    ]
    for extra, status, param in cases:
        resp = client.post("/v1/responses", json={"model": model, "input": "x", **extra})
        assert resp.status_code == status, (extra, resp.text)
        assert resp.json()["error"]["param"].startswith(param), (extra, resp.text)


def test_stored_responses_and_chat_completions_go_after_the_retention_period(served):
    """SQFT_STORED_RETENTION_DAYS (30 by default, as OpenAI keeps them): the manager's sweep deletes what
    was stored before then, and keeps what is newer."""
    client, model = served
    old_response = _respond(client, model=model, input="Name a colour.", **GREEDY)
    new_response = _respond(client, model=model, input="Name a fruit.", **GREEDY)
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "store": True}
    old_chat, new_chat = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    db, day = client.app.state.db, 86400
    db.execute("UPDATE responses SET created_at = created_at - ? WHERE id = ?", (31 * day, old_response["id"]))
    db.execute("UPDATE chat_completions SET created_at = created_at - ? WHERE id = ?", (31 * day, old_chat["id"]))
    db.execute("UPDATE chat_completions SET created_at = created_at - ? WHERE id = ?", (29 * day, new_chat["id"]))
    manager = client.app.state.job_manager
    manager._next_expiry_sweep = 0.0  # the next tick sweeps
    manager.tick()
    assert client.get(f"/v1/responses/{old_response['id']}").status_code == 404
    assert client.get(f"/v1/chat/completions/{old_chat['id']}").status_code == 404
    assert client.get(f"/v1/responses/{new_response['id']}").status_code == 200
    assert client.get(f"/v1/chat/completions/{new_chat['id']}").status_code == 200
    with pytest.raises(SystemExit, match=r"SQFT_STORED_RETENTION_DAYS=-1\.0 is negative"):
        Settings.from_env({"SQFT_STORED_RETENTION_DAYS": "-1"})


def _ended(client, response_id: str) -> dict:
    return wait_until(
        lambda: (
            (r := client.get(f"/v1/responses/{response_id}").json())["status"] not in ("queued", "in_progress") and r
        ),
        60,
        what=f"background response {response_id}",
    )


def test_a_background_response_is_answered_later_as_in_the_foreground(served):
    client, model = served
    ask = {"model": model, "input": "Name a colour.", **GREEDY}
    queued = _respond(client, **ask, background=True)
    assert queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    done = _ended(client, queued["id"])
    foreground = _respond(client, **ask)
    assert done["status"] == foreground["status"] == "incomplete"  # cut by max_output_tokens, as the foreground
    assert output_text(done) == output_text(foreground) and done["usage"] == foreground["usage"] and done["background"]
    # Continued as any stored response.
    _continued(client, model, done, "Name a colour.", "Another.")
    # Cancelling one that ended answers it as it ended; only background responses can be cancelled.
    again = client.post(f"/v1/responses/{done['id']}/cancel")
    assert again.status_code == 200 and again.json() == done
    refused = client.post(f"/v1/responses/{foreground['id']}/cancel")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_id"
    assert client.post(f"/v1/responses/{done['id']}/cancel", headers=BOB).status_code == 404
    assert client.post("/v1/responses/resp_missing/cancel").status_code == 404
    resp = client.post("/v1/responses", json={**ask, "background": True, "store": False})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "store", resp.text


def test_a_background_response_streams_and_replays_its_events_from_any_sequence_number(served):
    client, model = served
    ask = {"model": model, "input": "Name a colour.", **GREEDY}
    foreground = _respond(client, **ask)
    events = _events_of(client.post("/v1/responses", json={**ask, "background": True, "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.queued", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == f"response.{foreground['status']}" and "error" not in kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "queued" and events[2]["response"]["status"] == "in_progress"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final, response_id = events[-1]["response"], events[0]["response"]["id"]
    assert text == output_text(final) == output_text(foreground) and final["usage"] == foreground["usage"]
    assert client.get(f"/v1/responses/{response_id}").json() == final  # stored before its last event
    # Replayed once ended, whole or after any sequence number (what a reader that lost its connection saw).
    assert _events_of(client.get(f"/v1/responses/{response_id}", params={"stream": "true"})) == events
    after = client.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": 3})
    assert _events_of(after) == events[4:]
    last = client.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": len(events)})
    assert _events_of(last) == []
    # A foreground response's stream ended with its connection; `starting_after` goes with `stream`.
    for params, param in (
        ({"stream": "true"}, "stream"),
        ({"starting_after": 1}, "starting_after"),
        ({"stream": "true", "starting_after": -1}, "starting_after"),
    ):
        resp = client.get(f"/v1/responses/{foreground['id']}", params=params)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert client.get(f"/v1/responses/{response_id}", params={"stream": "true"}, headers=BOB).status_code == 404


def test_cancel_stops_a_background_response(served, tiny_model_dir):
    client, model = served
    # The random base model greedily writes all 480 tokens (no end token): seconds, not milliseconds.
    long = {"model": str(tiny_model_dir), "input": "Count.", "temperature": 0, "max_output_tokens": 480}
    queued = _respond(client, **long, background=True)
    cancelled = client.post(f"/v1/responses/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    # It stays cancelled once its generation has stopped, which frees the engine for the next request.
    assert _respond(client, model=model, input="Hi", **GREEDY)["status"] in ("completed", "incomplete")
    assert client.get(f"/v1/responses/{queued['id']}").json()["status"] == "cancelled"
    resp = client.post(
        "/v1/responses", json={**GREEDY, "model": model, "input": "x", "previous_response_id": queued["id"]}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "previous_response_id", resp.text
    # Its stream is what it sent before the cancel, then ends: no answer follows.
    events = _events_of(client.get(f"/v1/responses/{queued['id']}", params={"stream": "true"}))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.queued"]
    assert not any(e["type"].startswith(("response.completed", "response.incomplete")) for e in events)


def test_a_background_response_a_restart_cut_short_is_failed(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data", inference_threads=1)
    with TestClient(create_app(settings)) as client:
        fine_tune_briefly(client, tiny_model_dir, tmp_path)
        long = {"model": str(tiny_model_dir), "input": "Count.", "temperature": 0, "max_output_tokens": 480}
        queued = _respond(client, **long, background=True)
    with TestClient(create_app(settings)) as client:  # the service again, after a stop mid-generation
        got = client.get(f"/v1/responses/{queued['id']}").json()
        assert got["status"] == "failed" and "service stopped" in got["error"]["message"], got
        # Its events went with the service: its stream tells it as created, then failed.
        events = _events_of(client.get(f"/v1/responses/{queued['id']}", params={"stream": "true"}))
        assert [(e["type"], e["response"]["status"]) for e in events] == [
            ("response.created", "queued"),
            ("response.failed", "failed"),
        ]
        assert events[1]["response"] == got
