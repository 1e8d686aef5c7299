"""OpenAI's Batch API (``/v1/batches``): the real app, real job processes, a tiny Llama fine-tuned once.

A batch's answers are compared with what ``/v1/chat/completions`` and ``/v1/completions`` answer for the
same greedy requests; a line the model can't answer lands in the error file; cancel keeps what was
answered; a job killed mid-batch runs again from where it stopped without answering a line twice.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai.types import Batch

from sqft_service.app import create_app
from sqft_service.settings import Settings
from tests.helpers import alpaca_records, long_conversation, output_text, wait_until, write_json
from tests.integration.conftest import make_settings, sdk_job_end, wait_status

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
PICK = {
    "type": "json_schema",
    "json_schema": {
        "name": "pick",
        "schema": {
            "type": "object",
            "properties": {"c": {"enum": ["red", "blue"]}},
            "required": ["c"],
            "additionalProperties": False,
        },
    },
}
PICK_TOOL = {"type": "function", "function": {"name": "pick", "parameters": PICK["json_schema"]["schema"]}}
ASK = [{"role": "user", "content": "Repeat the word red."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("batches")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb", inference_threads=1)
    with TestClient(create_app(settings), headers=ALICE) as client:
        with open(write_json(root / "a.json", alpaca_records(16)), "rb") as handle:
            file_id = client.post("/v1/files", files={"file": ("a.json", handle)}, data={"purpose": "fine-tune"})
        body = {
            "model": str(tiny_model_dir),
            "training_file": file_id.json()["id"],
            "Training": {"batch_size": 4, "epochs": 1, "learning_rate": 5e-2},
            "General": {"lora_config": {"r": 4, "lora_alpha": 16}},
        }
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        done = wait_until(
            lambda: (
                (j := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and j
            ),
            300,
            what="the fine-tune",
        )
        assert done["status"] == "succeeded", done["error"]
        merged = client.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": job["id"]})
        assert merged.status_code == 200, merged.text
        yield client, done["fine_tuned_model"]


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _upload(client, tmp_path: Path, lines: list, name: str = "batch.jsonl", headers=ALICE) -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with open(path, "rb") as handle:
        resp = client.post("/v1/files", files={"file": (name, handle)}, data={"purpose": "batch"}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _create(client, file_id: str, endpoint: str = "/v1/chat/completions", **extra):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint, **extra})


def _ended(client, batch_id: str, timeout: float = 300) -> dict:
    return wait_until(
        lambda: (
            (b := client.get(f"/v1/batches/{batch_id}").json())["status"]
            in ("completed", "failed", "cancelled", "expired")
            and b
        ),
        timeout,
        what=f"batch {batch_id} to end",
    )


def _rows(client, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    text = client.get(f"/v1/files/{file_id}/content").text
    return {row["custom_id"]: row for row in map(json.loads, text.splitlines())}


def test_a_batch_answers_each_line_as_the_routes_do(served, tmp_path, tiny_model_dir):
    client, tuned = served
    greedy = {"max_tokens": 6, "temperature": 0}
    chats = {
        "tuned": {"model": tuned, "messages": ASK, **greedy},
        "merged": {"model": f"{tuned}:merged", "messages": ASK, **greedy},
        "base": {"model": str(tiny_model_dir), "messages": ASK, **greedy},
        "two": {"model": tuned, "messages": ASK, "n": 2, **greedy},
        # Held to a schema (answered alone, as the route does, not in a batched generation).
        "json": {"model": tuned, "messages": ASK, "max_tokens": 16, "temperature": 0, "response_format": PICK},
        # A required call (the base model renders tools: it was not trained on Alpaca), read as the route reads it.
        "call": {
            "model": str(tiny_model_dir),
            "messages": ASK,
            "max_tokens": 32,
            "temperature": 0,
            "tools": [PICK_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "pick"}},
        },
        # Alpaca has no system prompt: the route's 400 naming `messages`, as this line's error.
        "system": {"model": tuned, "messages": [{"role": "system", "content": "Be brief."}, *ASK]},
    }
    file_id = _upload(client, tmp_path, [_line(cid, body) for cid, body in chats.items()])
    created = _create(client, file_id, metadata={"run": "nightly"})
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch["object"] == "batch" and batch["id"].startswith("batch_")
    assert batch["status"] in ("validating", "in_progress") and batch["endpoint"] == "/v1/chat/completions"
    assert batch["request_counts"]["total"] == 7 and batch["metadata"] == {"run": "nightly"}
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600

    done = _ended(client, batch["id"])
    assert done["status"] == "completed", done
    parsed = Batch.model_validate(done)  # the openai SDK's own type reads it
    assert parsed.request_counts is not None and parsed.request_counts.completed == 6
    assert done["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    assert done["completed_at"] >= done["in_progress_at"] >= done["created_at"]
    answers, errors = _rows(client, done["output_file_id"]), _rows(client, done["error_file_id"])
    assert set(answers) == {"tuned", "merged", "base", "two", "json", "call"} and set(errors) == {"system"}
    assert json.loads(answers["json"]["response"]["body"]["choices"][0]["message"]["content"])["c"] in ("red", "blue")
    (call,) = answers["call"]["response"]["body"]["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "pick" and json.loads(call["function"]["arguments"])["c"] in ("red", "blue")
    usage = done["usage"]  # OpenAI's: the answered requests' prompt and generated tokens
    assert usage["input_tokens"] == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in answers.values())
    assert usage["output_tokens"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in answers.values())
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    for cid, row in answers.items():
        assert row["id"].startswith("batch_req_") and row["error"] is None
        assert row["response"]["status_code"] == 200
        got = row["response"]["body"]
        want = client.post("/v1/chat/completions", json=chats[cid]).json()
        assert got["object"] == "chat.completion" and got["model"] == chats[cid]["model"]
        assert [c["message"]["content"] for c in got["choices"]] == [c["message"]["content"] for c in want["choices"]]
        assert got["usage"] == want["usage"]
    refused = errors["system"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "messages"
    # The files are the batch's project's, of OpenAI's purpose for them.
    output = client.get(f"/v1/files/{done['output_file_id']}").json()
    assert output["purpose"] == "batch_output" and output["filename"] == f"{batch['id']}_output.jsonl"
    assert client.get(f"/v1/files/{done['output_file_id']}", headers=BOB).status_code == 404
    assert client.get(f"/v1/batches/{batch['id']}", headers=BOB).status_code == 404
    assert batch["id"] in [b["id"] for b in client.get("/v1/batches").json()["data"]]
    assert client.get("/v1/batches", headers=BOB).json()["data"] == []
    log = client.get(f"/v1/batches/{batch['id']}/log")
    assert log.status_code == 200 and "answering 7 requests to /v1/chat/completions" in log.text
    assert client.get(f"/v1/batches/{batch['id']}/log", headers=BOB).status_code == 404
    again = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 400 and again.json()["error"]["code"] == "batch_not_cancellable"


def test_completions_batches_answer_every_prompt_of_a_line(served, tmp_path):
    client, tuned = served
    body = {"model": tuned, "prompt": ["The sky is", "Grass is"], "max_tokens": 4, "temperature": 0}
    # A prompt scored, as lm-eval-harness asks (token ids, echo, logprobs): answered as the route does.
    scored = {"model": tuned, "prompt": [[504, 3575, 282], [9551]], "max_tokens": 1, "temperature": 0}
    scored |= {"logprobs": 2, "echo": True}
    lines = [_line("p", body, "/v1/completions"), _line("s", scored, "/v1/completions")]
    file_id = _upload(client, tmp_path, lines)
    expiry = {"anchor": "created_at", "seconds": 86400}
    done = _ended(client, _create(client, file_id, "/v1/completions", output_expires_after=expiry).json()["id"])
    output = client.get(f"/v1/files/{done['output_file_id']}").json()
    assert output["expires_at"] == output["created_at"] + 86400  # as asked: `output_expires_after`
    rows = _rows(client, done["output_file_id"])
    got, want = rows["p"]["response"]["body"], client.post("/v1/completions", json=body).json()
    assert got["object"] == "text_completion" and [c["text"] for c in got["choices"]] == [
        c["text"] for c in want["choices"]
    ]
    got, want = rows["s"]["response"]["body"], client.post("/v1/completions", json=scored).json()
    assert [c["logprobs"] for c in got["choices"]] == [c["logprobs"] for c in want["choices"]]
    assert len(got["choices"][0]["logprobs"]["token_logprobs"]) == 3 + 1


def test_responses_batches_answer_each_line_as_post_v1_responses_does(served, tmp_path, tiny_model_dir):
    client, tuned = served
    greedy = {"max_output_tokens": 6, "temperature": 0, "store": False}
    asks = {
        "plain": {"model": tuned, "input": "Repeat the word red.", **greedy},
        "items": {"model": f"{tuned}:merged", "input": [{"role": "user", "content": "Name a color."}], **greedy},
        "json": {"model": tuned, "input": "Pick one.", "temperature": 0, "store": False, "max_output_tokens": 16,
                 "text": {"format": {"type": "json_schema", **PICK["json_schema"]}}},
        "call": {"model": str(tiny_model_dir), "input": "Pick one.", "temperature": 0, "max_output_tokens": 32,
                 "tools": [{"type": "function", **PICK_TOOL["function"]}], "tool_choice": "required"},
        # Alpaca has no system prompt: the route's 400, naming the Responses field.
        "system": {"model": tuned, "input": "Hi", "instructions": "Be brief.", "store": False},
        # Longer than the model's 512 tokens: its oldest turns dropped, as the route drops them.
        "long": {"model": str(tiny_model_dir), "input": long_conversation(12), "truncation": "auto", **greedy},
    }  # fmt: skip
    lines = [_line(cid, body, "/v1/responses") for cid, body in asks.items()]
    done = _ended(client, _create(client, _upload(client, tmp_path, lines), "/v1/responses").json()["id"])
    assert done["status"] == "completed" and done["endpoint"] == "/v1/responses", done
    assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    answers, errors = _rows(client, done["output_file_id"]), _rows(client, done["error_file_id"])
    for cid in ("plain", "items", "json", "long"):
        got, want = answers[cid]["response"]["body"], client.post("/v1/responses", json=asks[cid]).json()
        assert got["object"] == "response" and got["id"].startswith("resp_") and got["status"] == want["status"]
        assert output_text(got) == output_text(want) and got["usage"] == want["usage"]
        assert got["store"] is False and client.get(f"/v1/responses/{got['id']}").status_code == 404
    assert json.loads(output_text(answers["json"]["response"]["body"]))["c"] in ("red", "blue")
    (call,) = [item for item in answers["call"]["response"]["body"]["output"] if item["type"] == "function_call"]
    assert call["name"] == "pick" and json.loads(call["arguments"])["c"] in ("red", "blue")
    refused = errors["system"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "input", refused
    usage = done["usage"]  # a response counts input_tokens / output_tokens
    bodies = [row["response"]["body"]["usage"] for row in answers.values()]
    assert usage["input_tokens"] == sum(u["input_tokens"] for u in bodies) > 0
    assert usage["output_tokens"] == sum(u["output_tokens"] for u in bodies) > 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"previous_response_id": "resp_x"}, "`body.previous_response_id`: a batch line can't continue"),
        ({"conversation": "conv_x"}, "`body.conversation`: a batch line can't read or add to"),
        ({"store": True}, "`body.store`"),
        ({"stream": True}, "`body.stream`"),
        (
            {"text": {"format": {"type": "json_object"}}, "tools": [{"type": "function", "name": "f"}]},
            "`body.text.format`",
        ),
    ],
)
def test_a_responses_line_a_job_cannot_answer_is_a_400_naming_it(served, tmp_path, body, needle):
    client, tuned = served
    lines = [_line("a", {"model": tuned, "input": "Hi", "store": False}, "/v1/responses"),
             _line("b", {"model": tuned, "input": "Hi", **body}, "/v1/responses")]  # fmt: skip
    resp = _create(client, _upload(client, tmp_path, lines), "/v1/responses")
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"] and "line 2 of the input file" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2 of the input file: not valid JSON"),
        (_line("a", {"model": "m", "messages": ASK}), "line 2 of the input file: `custom_id` 'a' is used"),
        (_line("b", {"model": "m", "messages": ASK}, "/v1/completions"), "`url` must be the batch's endpoint"),
        (_line("b", {"model": "m", "messages": ASK, "audio": {}}), "`body`: Unknown parameter `audio`"),
        (_line("b", {"model": "m", "messages": ASK, "stream": True}), "`body.stream`"),
        (_line("b", {"model": "m", "messages": ASK, "store": True}), "`body.store`"),
        (_line("b", {"model": "ft:nope:sqft:ftjob-x", "messages": ASK}), "`body.model`: The model"),
        ({**_line("b", {"model": "m", "messages": ASK}), "extra": 1}, "unknown key `extra`"),
    ],
)
def test_a_bad_input_file_is_a_400_naming_its_line(served, tmp_path, line, needle):
    client, tuned = served
    first = _line("a", {"model": tuned, "messages": ASK})
    if isinstance(line, dict) and line.get("body", {}).get("model") == "m":
        line["body"]["model"] = tuned
    resp = _create(client, _upload(client, tmp_path, [first, line]))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "input_file_id" and needle in error["message"], error["message"]


def test_a_bad_create_names_its_field(served, tmp_path):
    client, tuned = served
    file_id = _upload(client, tmp_path, [_line("a", {"model": tuned, "messages": ASK})])
    with open(write_json(tmp_path / "t.json", alpaca_records(2)), "rb") as handle:
        tuning = client.post("/v1/files", files={"file": ("t.json", handle)}, data={"purpose": "fine-tune"}).json()
    cases = [
        (_create(client, file_id, "/v1/embeddings"), 400, "endpoint"),
        (_create(client, file_id, completion_window="1h"), 400, "completion_window"),
        (_create(client, file_id, output_expires_after={"anchor": "created_at", "seconds": 10**9}), 400,
         "output_expires_after.seconds"),
        (_create(client, tuning["id"]), 400, "input_file_id"),
        (_create(client, "file-missing"), 404, "input_file_id"),
        (client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"}, headers=BOB), 404,
         "input_file_id"),
    ]  # fmt: skip
    for resp, status, param in cases:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["param"] == param


def _long_batch(client, tmp_path: Path, model: str, n: int) -> str:
    # Sampled, so answered one by one (greedy lines are batched): slow enough to stop half-way.
    bodies = [{"model": model, "prompt": f"Count {i}:", "max_tokens": 24, "seed": i} for i in range(n)]
    lines = [_line(f"r{i}", body, "/v1/completions") for i, body in enumerate(bodies)]
    return _create(client, _upload(client, tmp_path, lines), "/v1/completions").json()["id"]


def _started(client, batch_id: str) -> dict:
    batch = wait_until(
        lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["request_counts"]["completed"] > 0 and b,
        120,
        what="the batch to answer its first requests",
    )
    assert batch["status"] == "in_progress", batch  # still under way: what follows stops it half-way
    return batch


def test_cancel_keeps_what_was_answered_and_a_model_in_use_stays(served, tmp_path, tiny_model_dir):
    client, tuned = served
    batch_id = _long_batch(client, tmp_path, f"{tuned}:merged", 400)
    _started(client, batch_id)
    busy = client.delete(f"/v1/models/{tuned}:merged")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_in_use"
    assert batch_id in busy.json()["error"]["message"]
    cancelling = client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelling["status"] in ("cancelling", "cancelled")
    done = _ended(client, batch_id, timeout=60)
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    answered = done["request_counts"]["completed"]
    assert 0 < answered < 400
    assert len(_rows(client, done["output_file_id"])) == answered


def test_a_batch_killed_mid_way_runs_again_without_repeating_a_line(served, tmp_path, tiny_model_dir):
    client, _ = served
    batch_id = _long_batch(client, tmp_path, str(tiny_model_dir), 120)
    _started(client, batch_id)
    job = client.app.state.job_manager.jobs.get(batch_id)
    os.kill(job.pid, signal.SIGKILL)  # a crash: no outcome, no cancel
    done = _ended(client, batch_id)
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 120, "completed": 120, "failed": 0}
    text = client.get(f"/v1/files/{done['output_file_id']}/content").text
    ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(120))  # each once
    generated = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in text.splitlines())
    assert done["usage"]["output_tokens"] == generated  # the lines before the crash counted once too
    events, _ = client.app.state.batch_service.events.list_events(batch_id, limit=200)
    messages = [e.message for e in events]
    assert any(m.startswith("Interrupted: the job process died") for m in messages)
    assert any(m.startswith("resuming: ") and m.endswith(" of 120 requests already answered") for m in messages)


WINDOW_S = 15


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A service whose batches have WINDOW_S seconds (SQFT_BATCH_WINDOW_S) and one job at a time."""
    settings = make_settings(tmp_path_factory.mktemp("window") / "data", batch_window_s=WINDOW_S, inference_threads=1)
    with TestClient(create_app(settings)) as client:
        yield client


def _expired_rows(client, done: dict) -> dict[str, dict]:
    errors = _rows(client, done["error_file_id"])
    for row in errors.values():  # OpenAI's line for a request the window left no time for
        assert row["response"] is None and row["id"].startswith("batch_req_")
        assert row["error"]["code"] == "batch_expired" and "completion window expired" in row["error"]["message"]
    return errors


def test_a_batch_still_queued_when_its_window_ends_expires_whole(windowed, tmp_path, tiny_model_dir):
    client = windowed
    with open(write_json(tmp_path / "t.json", alpaca_records(64)), "rb") as handle:
        training = client.post("/v1/files", files={"file": ("t.json", handle)}, data={"purpose": "fine-tune"}).json()
    body = {"model": str(tiny_model_dir), "training_file": training["id"], "Training": {"epochs": 1000}}  # minutes
    holder = client.post("/v1/fine_tuning/jobs", json=body).json()  # holds the one job slot
    wait_status(client, holder["id"], ("running",))
    lines = [_line(f"q{i}", {"model": str(tiny_model_dir), "messages": ASK, "max_tokens": 2}) for i in range(3)]
    batch = _create(client, _upload(client, tmp_path, lines)).json()
    assert batch["expires_at"] == batch["created_at"] + WINDOW_S
    done = _ended(client, batch["id"], timeout=WINDOW_S + 30)
    assert done["status"] == "expired", done
    assert Batch.model_validate(done).status == "expired"
    assert done["in_progress_at"] is None and done["completed_at"] is None
    assert done["expired_at"] >= done["expires_at"]
    assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert done["output_file_id"] is None and set(_expired_rows(client, done)) == {"q0", "q1", "q2"}
    events = client.app.state.batch_service.events.list_events(batch["id"], limit=20)[0]
    assert any(e.message.startswith("Batch expired: its completion window ended before it started") for e in events)
    assert client.post(f"/v1/fine_tuning/jobs/{holder['id']}/cancel").status_code == 200
    wait_status(client, holder["id"], ("cancelled",))


def test_a_batch_running_when_its_window_ends_keeps_its_answers(windowed, tmp_path, tiny_model_dir):
    client = windowed
    total = 3000  # far more than the tiny model answers one by one in WINDOW_S seconds
    batch_id = _long_batch(client, tmp_path, str(tiny_model_dir), total)
    done = _ended(client, batch_id, timeout=WINDOW_S + 60)
    assert done["status"] == "expired", done
    assert done["in_progress_at"] is not None and done["expired_at"] >= done["expires_at"]
    answered = done["request_counts"]["completed"]
    assert 0 < answered < total and done["request_counts"]["failed"] == total - answered
    answers, errors = _rows(client, done["output_file_id"]), _expired_rows(client, done)
    assert len(answers) == answered and len(errors) == total - answered
    assert set(answers) | set(errors) == {f"r{i}" for i in range(total)}  # every request once, one way or the other
    assert done["usage"]["output_tokens"] == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in answers.values()
    )
    log = client.get(f"/v1/batches/{batch_id}/log").text
    assert f"the completion window ended: {answered} of {total} requests answered" in log


def test_the_openai_sdk_runs_a_batch_on_a_real_server(sdk, tmp_path, tiny_model_dir):
    """The official SDK end to end: fine-tune, upload a batch file, create, poll, read the answers."""
    client = sdk
    with open(write_json(tmp_path / "train.json", alpaca_records(8)), "rb") as handle:
        training = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=training.id, extra_body={"Training": {"max_train_steps": 2}}
    )
    tuned = sdk_job_end(client, job.id)
    assert tuned.status == "succeeded", tuned.error
    lines = [
        _line(f"q{i}", {"model": tuned.fine_tuned_model, "messages": ASK, "max_tokens": 3 + i, "temperature": 0})
        for i in range(3)
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with open(path, "rb") as handle:
        requests = client.files.create(file=handle, purpose="batch")
    batch = client.batches.create(
        input_file_id=requests.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"}
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"k": "v"}
    done = wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed", "cancelled") and b,
        240,
        what="the batch",
    )
    assert done.status == "completed" and done.request_counts.completed == 3, done
    assert done.error_file_id is None
    rows = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["q0", "q1", "q2"]
    for row in rows:
        body = row["response"]["body"]
        i = int(row["custom_id"][1:])
        assert body["object"] == "chat.completion" and 1 <= body["usage"]["completion_tokens"] <= 3 + i
    assert batch.id in [b.id for b in client.batches.list().data]


def test_a_batch_window_that_is_not_positive_is_refused():
    with pytest.raises(SystemExit, match=r"SQFT_BATCH_WINDOW_S=0\.0 is not a positive number of seconds"):
        Settings.from_env({"SQFT_BATCH_WINDOW_S": "0"})
