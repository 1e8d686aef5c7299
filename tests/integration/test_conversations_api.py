"""/v1/conversations (OpenAI's Conversations API) and responses made in a conversation: the real app and
engine on a tiny random Llama fine-tuned on chat records; every answer is the chat completion of the
conversation's turns, which it must equal."""

from __future__ import annotations

from tests.helpers import long_conversation, output_text, wait_until
from tests.integration.test_responses_api import BOB, GREEDY, _chat, _events_of, _respond, served

__all__ = ["served"]  # the module's fixture: Alice and Bob, and Alice's chat-trained model


def _conversation(client, **body) -> dict:
    resp = client.post("/v1/conversations", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _items(client, conversation_id: str, **params) -> dict:
    resp = client.get(f"/v1/conversations/{conversation_id}/items", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_conversation_and_its_items_are_created_listed_changed_and_deleted(served):
    client, _ = served
    user = {"role": "user", "content": "Hi"}
    made = _conversation(client, items=[user, {"type": "message", "role": "assistant", "content": "Hello"}],
                         metadata={"topic": "greeting"})  # fmt: skip
    assert (
        made["object"] == "conversation"
        and made["id"].startswith("conv_")
        and made["metadata"] == {"topic": "greeting"}
    )
    cid = made["id"]
    assert client.get(f"/v1/conversations/{cid}").json() == made
    listed = _items(client, cid)  # newest first, as OpenAI lists them
    assert [i["role"] for i in listed["data"]] == ["assistant", "user"] and listed["has_more"] is False
    assert listed["data"][1]["content"] == [{"type": "input_text", "text": "Hi"}]
    added = client.post(f"/v1/conversations/{cid}/items", json={"items": [user, {**user, "content": "Again"}]}).json()
    assert [i["content"][0]["text"] for i in added["data"]] == ["Hi", "Again"] and added["first_id"] != added["last_id"]
    oldest = _items(client, cid, order="asc", limit=2)
    assert [i["content"][0]["text"] for i in oldest["data"]] == ["Hi", "Hello"] and oldest["has_more"] is True
    rest = _items(client, cid, order="asc", after=oldest["last_id"])
    assert [i["id"] for i in rest["data"]] == [i["id"] for i in added["data"]] and rest["has_more"] is False
    one = client.get(f"/v1/conversations/{cid}/items/{added['first_id']}").json()
    assert one == added["data"][0]
    changed = client.post(f"/v1/conversations/{cid}", json={"metadata": {"topic": "other"}}).json()
    assert changed["metadata"] == {"topic": "other"} and changed["created_at"] == made["created_at"]
    assert client.delete(f"/v1/conversations/{cid}/items/{added['first_id']}").json()["id"] == cid
    assert len(_items(client, cid)["data"]) == 3
    # Refused or not found, naming the field; another project's conversation is not found.
    item = f"/v1/conversations/{cid}/items/{added['first_id']}"
    for resp, status, param in (
        (client.get(item), 404, "item_id"),
        (client.get(f"/v1/conversations/{cid}", headers=BOB), 404, "conversation_id"),
        (client.post(f"/v1/conversations/{cid}/items", json={"items": [user]}, headers=BOB), 404, "conversation_id"),
        (client.get(f"/v1/conversations/{cid}/items", params={"after": "msg_none"}), 404, "after"),
        (client.post(f"/v1/conversations/{cid}/items", json={"items": []}), 400, "items"),
        (client.post(f"/v1/conversations/{cid}/items", json={"items": [user] * 21}), 400, "items"),
        (
            client.post(f"/v1/conversations/{cid}/items", json={"items": [{**user, "id": oldest["first_id"]}]}),
            400,
            "items",
        ),
        (client.post("/v1/conversations", json={"items": [{**user, "id": "m1"}, {**user, "id": "m1"}]}), 400, "items"),
        (client.post("/v1/conversations", json={"metadata": {"k" * 65: "v"}}), 400, "metadata"),
        (client.post(f"/v1/conversations/{cid}", json={"metadata": {"a": "b"}, "extra": 1}), 400, "extra"),
    ):
        assert resp.status_code == status and resp.json()["error"]["param"].startswith(param), resp.text
    assert len(_items(client, cid)["data"]) == 3  # nothing refused was added
    deleted = client.delete(f"/v1/conversations/{cid}").json()
    assert deleted == {"id": cid, "object": "conversation.deleted", "deleted": True}
    assert client.get(f"/v1/conversations/{cid}").status_code == 404
    assert client.get(f"/v1/conversations/{cid}/items").status_code == 404


def test_responses_in_a_conversation_read_it_and_add_their_input_and_answer(served):
    client, model = served
    cid = _conversation(client, items=[{"role": "user", "content": "Name a colour."}])["id"]
    first = _respond(client, model=model, input="Name another.", conversation=cid, **GREEDY)
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "user", "content": "Name another."}]
    assert output_text(first) == _chat(client, model, turns)["choices"][0]["message"]["content"]
    assert first["conversation"] == {"id": cid}
    items = _items(client, cid, order="asc")["data"]
    assert [i["role"] for i in items] == ["user", "user", "assistant"] and items[-1] == first["output"][0]
    # The next one continues it, by id or as an object; its answer is chat's to the same turns.
    second = _respond(client, model=model, input="And one more.", conversation={"id": cid}, **GREEDY)
    turns += [{"role": "assistant", "content": output_text(first)}, {"role": "user", "content": "And one more."}]
    assert output_text(second) == _chat(client, model, turns)["choices"][0]["message"]["content"]
    assert len(_items(client, cid)["data"]) == 5
    # Streamed and in the background alike: added when they end, before their last event.
    ask = {"model": model, "input": "Once more.", "conversation": cid, **GREEDY}
    events = _events_of(client.post("/v1/responses", json={**ask, "stream": True}))
    assert _items(client, cid)["data"][0] == events[-1]["response"]["output"][0]
    queued = _respond(client, **ask, background=True)
    done = wait_until(
        lambda: (
            (r := client.get(f"/v1/responses/{queued['id']}").json())["status"] not in ("queued", "in_progress") and r
        ),
        60,
        what="the background response",
    )
    assert _items(client, cid)["data"][0] == done["output"][0] and len(_items(client, cid, limit=100)["data"]) == 9
    # Refused, naming the field, and nothing added.
    existing = _items(client, cid)["data"][-1]
    for body, status, param in (
        ({"previous_response_id": first["id"]}, 400, "conversation"),
        ({"input": [{"role": "user", "content": "Hi", "id": existing["id"]}]}, 400, "input"),
        ({"conversation": "conv_missing"}, 404, "conversation"),
    ):
        resp = client.post("/v1/responses", json={**ask, **body})
        assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
    resp = client.post("/v1/responses", json=ask, headers=BOB)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "conversation", resp.text
    assert len(_items(client, cid, limit=100)["data"]) == 9


def test_a_cancelled_response_adds_nothing_to_its_conversation(served, tiny_model_dir):
    client, _ = served
    cid = _conversation(client)["id"]
    long = {"model": str(tiny_model_dir), "input": "Count.", "temperature": 0, "max_output_tokens": 480}
    queued = _respond(client, **long, conversation=cid, background=True)
    assert client.post(f"/v1/responses/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert _respond(client, model=str(tiny_model_dir), input="Hi", **GREEDY)["status"] in ("completed", "incomplete")
    assert _items(client, cid)["data"] == []


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit_and_the_conversation_keeps_them(served):
    client, model = served
    turns = long_conversation(12)  # far over the model's 512 tokens
    cid = _conversation(client, items=turns[:20])["id"]
    cid_more = client.post(f"/v1/conversations/{cid}/items", json={"items": turns[20:-1]})
    assert cid_more.status_code == 200, cid_more.text
    ask = {"model": model, "input": turns[-1]["content"], "conversation": cid, **GREEDY}
    refused = client.post("/v1/responses", json=ask)  # `truncation` "disabled", the default
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.text
    assert refused.json()["error"]["param"] == "input"
    answered = _respond(client, **ask, truncation="auto")
    assert answered["truncation"] == "auto" and answered["usage"]["input_tokens"] + 8 <= 512
    # The chat answer to the longest tail of the turns (from a question on) that chat accepts: the same.
    for start in range(0, len(turns), 2):
        chat = client.post(
            "/v1/chat/completions", json={"model": model, "messages": turns[start:], "max_tokens": 8, "temperature": 0}
        )
        if chat.status_code == 200:
            break
        assert chat.json()["error"]["code"] == "context_length_exceeded", chat.text
    assert start > 0 and output_text(answered) == chat.json()["choices"][0]["message"]["content"]
    assert answered["usage"]["input_tokens"] == chat.json()["usage"]["prompt_tokens"]
    # The conversation keeps every turn (the next response fits it again); streamed alike.
    assert len(_items(client, cid, limit=100)["data"]) == len(turns) + 1
    events = _events_of(client.post("/v1/responses", json={**ask, "truncation": "auto", "stream": True}))
    assert events[-1]["response"]["usage"]["input_tokens"] <= 512 - 8
    # An input too long on its own is refused as too long, whatever `truncation` says.
    alone = {**ask, "conversation": None, "input": "word " * 600, "truncation": "auto"}
    resp = client.post("/v1/responses", json=alone)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input", resp.text


def test_input_tokens_counts_the_prompt_a_response_would_have(served):
    client, model = served

    def count(**body) -> int:
        resp = client.post("/v1/responses/input_tokens", json={"model": model, **body})
        assert resp.status_code == 200 and resp.json()["object"] == "response.input_tokens", resp.text
        return resp.json()["input_tokens"]

    ask = {"input": "Name a colour.", "instructions": "Be brief."}
    assert count(**ask) == _respond(client, model=model, **ask, **GREEDY)["usage"]["input_tokens"]
    cid = _conversation(client, items=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])[
        "id"
    ]
    counted = count(input="Name a colour.", conversation=cid)
    made = _respond(client, model=model, input="Name a colour.", conversation=cid, **GREEDY)
    assert counted == made["usage"]["input_tokens"] > count(input="Name a colour.")
    # No input: the conversation answered as it stands (its last turn a user's), counted alike.
    added = client.post(f"/v1/conversations/{cid}/items", json={"items": [{"role": "user", "content": "More."}]})
    assert added.status_code == 200
    counted = count(conversation=cid)
    again = _respond(client, model=model, conversation=cid, **GREEDY)
    assert again["usage"]["input_tokens"] == counted
    # A conversation too long for the model: counted whole, or as `truncation: "auto"` would send it.
    turns = long_conversation(12)
    assert count(input=turns) > 512 >= count(input=turns, truncation="auto") + 1
    for body, param in (
        ({"input": "x", "stream": True}, "stream"),
        ({"input": "x", "model": None}, "model"),
        ({}, "input"),
        ({"input": "x", "conversation": "conv_missing"}, "conversation"),
    ):
        resp = client.post("/v1/responses/input_tokens", json={"model": model, **body})
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text
