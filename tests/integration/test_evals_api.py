"""OpenAI's Evals API (``/v1/evals``): the real app, real ``eval_run`` job processes, a tiny Llama.

A ``jsonl`` run grades the samples it is given (scores checked against the metrics' known values); a
``completions`` run samples the model and each sample is what ``/v1/chat/completions`` answers the same
messages; a model grader always gives one of its labels; bad evals and runs are 400s naming the field or
the line; cancel keeps the items graded; another project sees none of it; the official SDK end to end.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import fine_tune_briefly, make_settings, sdk_job_end

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
FUZZY = {
    "type": "text_similarity",
    "name": "fuzzy",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.75,
}
JUDGE_NOWHERE = {
    "type": "label_model",
    "name": "j",
    "model": "nope/nothing",
    "input": [{"role": "user", "content": "x"}],
    "labels": ["a", "b"],
    "passing_labels": ["a"],
}
QUESTIONS = ["Say red.", "Say blue.", "Name a colour.", "What is two plus two?"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("evals")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb", inference_threads=1)
    with TestClient(create_app(settings), headers=ALICE) as client:
        # A base model is the caller's to use once it has fine-tuned it (ModelService): fine-tune it briefly.
        done = fine_tune_briefly(client, tiny_model_dir, root, steps=2)
        yield client, done["fine_tuned_model"]


def _eval(client, criteria=(EXACT, FUZZY), **extra) -> dict:
    body = {
        "name": "colours",
        "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        "testing_criteria": list(criteria),
        **extra,
    }
    resp = client.post("/v1/evals", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _ended(client, eval_id: str, run_id: str, timeout: float = 300) -> dict:
    return wait_until(
        lambda: (
            (r := client.get(f"/v1/evals/{eval_id}/runs/{run_id}").json())["status"]
            in ("completed", "failed", "canceled")
            and r
        ),
        timeout,
        what=f"run {run_id} to end",
    )


def _items(client, eval_id: str, run_id: str, **params) -> list[dict]:
    resp = client.get(f"/v1/evals/{eval_id}/runs/{run_id}/output_items", params={"limit": 100, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def test_a_jsonl_run_grades_the_samples_it_is_given(served):
    client, _ = served
    ev = _eval(client)
    assert ev["object"] == "eval" and ev["data_source_config"]["type"] == "custom"
    assert ev["data_source_config"]["schema"]["properties"]["item"] == ITEM_SCHEMA
    assert set(ev["data_source_config"]["schema"]["required"]) == {"item", "sample"}
    rows = [
        {"item": {"question": "q0", "answer": "hello"}, "sample": {"output_text": "hello"}},  # both pass
        {"item": {"question": "q1", "answer": "hello"}, "sample": {"output_text": "hallo"}},  # fuzzy 0.8 passes
        {"item": {"question": "q2", "answer": "hello"}, "sample": {"output_text": "bye"}},  # both fail
        # a chat completion as the sample: its message is the output text
        {
            "item": {"question": "q3", "answer": "yes"},
            "sample": {"model": "m", "choices": [{"message": {"role": "assistant", "content": "yes"}}]},
        },
    ]
    run = client.post(
        f"/v1/evals/{ev['id']}/runs",
        json={"name": "given", "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": rows}}},
    )
    assert run.status_code == 200, run.text
    assert run.json()["object"] == "eval.run" and run.json()["status"] in ("queued", "in_progress")
    done = _ended(client, ev["id"], run.json()["id"])
    assert done["status"] == "completed", done
    assert done["result_counts"] == {"total": 4, "errored": 0, "failed": 2, "passed": 2}
    assert done["per_testing_criteria_results"] == [
        {"testing_criteria": "exact", "passed": 2, "failed": 2},
        {"testing_criteria": "fuzzy", "passed": 3, "failed": 1},
    ]
    items = _items(client, ev["id"], done["id"])
    assert [i["datasource_item_id"] for i in items] == [0, 1, 2, 3]
    assert [i["status"] for i in items] == ["fail" if n in (1, 2) else "pass" for n in range(4)]
    fuzzy = {i["datasource_item_id"]: next(r for r in i["results"] if r["name"] == "fuzzy") for i in items}
    assert fuzzy[0]["score"] == 1.0 and fuzzy[1]["score"] == pytest.approx(0.8) and fuzzy[1]["passed"]
    assert items[3]["sample"]["output"] == [{"role": "assistant", "content": "yes"}]
    assert [i["id"] for i in _items(client, ev["id"], done["id"], status="fail")] == [items[1]["id"], items[2]["id"]]
    # pagination: two at a time, newest first
    page = client.get(
        f"/v1/evals/{ev['id']}/runs/{done['id']}/output_items", params={"limit": 2, "order": "desc"}
    ).json()
    assert [i["datasource_item_id"] for i in page["data"]] == [3, 2] and page["has_more"]
    rest = client.get(
        f"/v1/evals/{ev['id']}/runs/{done['id']}/output_items",
        params={"limit": 2, "order": "desc", "after": page["last_id"]},
    ).json()
    assert [i["datasource_item_id"] for i in rest["data"]] == [1, 0] and not rest["has_more"]
    one = client.get(f"/v1/evals/{ev['id']}/runs/{done['id']}/output_items/{items[2]['id']}").json()
    assert one == items[2]


def test_a_completions_run_samples_the_model_as_chat_completions_answers(served, tiny_model_dir):
    client, model = served  # the fine-tuned model answers; its base judges
    base = str(tiny_model_dir)
    label = {
        "type": "label_model",
        "name": "judge",
        "model": base,
        "input": [{"role": "user", "content": "Q: {{ item.question }} A: {{ sample.output_text }} Good?"}],
        "labels": ["good", "bad"],
        "passing_labels": ["good"],
    }
    score = {
        "type": "score_model",
        "name": "score",
        "model": base,
        "input": [{"role": "user", "content": "Rate 1 to 5: {{ sample.output_text }}"}],
        "range": [1, 5],
        "pass_threshold": 3,
    }
    ev = _eval(client, (EXACT, label, score))
    rows = [{"item": {"question": q, "answer": "red"}} for q in QUESTIONS]
    template = [{"role": "user", "content": "{{ item.question }}"}]  # an Alpaca model: one instruction
    data_source = {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "template", "template": template},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 5},
        "source": {"type": "file_content", "content": rows},
    }
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": data_source, "metadata": {"k": "v"}})
    assert run.status_code == 200, run.text
    done = _ended(client, ev["id"], run.json()["id"])
    assert done["status"] == "completed", done
    assert done["model"] == model and done["metadata"] == {"k": "v"}
    items = _items(client, ev["id"], done["id"])
    assert done["result_counts"]["total"] == 4 and done["result_counts"]["errored"] == 0, json.dumps(items[0])
    items = _items(client, ev["id"], done["id"])
    sampled = prompt = 0
    for item in items:
        messages = [{"role": "user", "content": item["datasource_item"]["question"]}]
        assert item["sample"]["input"] == messages
        answer = client.post(
            "/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 5}
        ).json()
        assert item["sample"]["output"][0]["content"] == answer["choices"][0]["message"]["content"]
        assert item["sample"]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
        sampled += answer["usage"]["completion_tokens"]
        prompt += answer["usage"]["prompt_tokens"]
        judge = next(r for r in item["results"] if r["name"] == "judge")
        assert judge["result"] in ("good", "bad") and judge["passed"] == (judge["result"] == "good")
        assert judge["sample"]["model"] == base  # the grader's own prompt and answer
        rated = next(r for r in item["results"] if r["name"] == "score")
        assert 1 <= rated["score"] <= 5 and rated["passed"] == (rated["score"] >= 3)
        exact = next(r for r in item["results"] if r["name"] == "exact")
        assert exact["passed"] == (answer["choices"][0]["message"]["content"] == "red")
    usage = {u["model_name"]: u for u in done["per_model_usage"]}
    assert usage[model]["invocation_count"] == 4 and usage[base]["invocation_count"] == 8  # two judges
    assert (usage[model]["completion_tokens"], usage[model]["prompt_tokens"]) == (sampled, prompt)


def test_a_responses_run_samples_as_the_responses_api_answers(served):
    client, model = served
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 6}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "short", "schema": schema}}
    held = {**EXACT, "input": "{{ sample.output_json.answer }}"}  # a field of the structured answer
    ev = _eval(client, (held,))
    rows = [{"item": {"question": q, "answer": "red"}} for q in QUESTIONS[:3]]
    data_source = {
        "type": "responses",
        "model": model,
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{ item.question }}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 32, "text": text},
        "source": {"type": "file_content", "content": rows},
    }
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": data_source})
    assert run.status_code == 200, run.text
    done = _ended(client, ev["id"], run.json()["id"])
    assert done["status"] == "completed" and done["result_counts"]["errored"] == 0, done
    for item in _items(client, ev["id"], done["id"]):
        question = item["datasource_item"]["question"]
        answer = client.post(
            "/v1/responses",
            json={"model": model, "input": question, "text": text, "temperature": 0, "max_output_tokens": 32},
        ).json()
        assert item["sample"]["output"][0]["content"] == answer["output"][0]["content"][0]["text"]
        assert set(json.loads(item["sample"]["output"][0]["content"])) == {"answer"}  # held to the schema
    stored = {**data_source, "source": {"type": "responses"}}
    resp = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": stored})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "data_source.source.type", resp.text


@pytest.mark.parametrize(
    ("criteria", "param", "needle"),
    [
        ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}, "testing_criteria[0].type", "code"),
        ({**FUZZY, "evaluation_metric": "meteor"}, "testing_criteria[0]", "WordNet"),
        ({**EXACT, "input": "{{ sample.output_text "}, "testing_criteria[0].input", "does not parse"),
        ({**EXACT, "reference": "{{ os.environ }}"}, "testing_criteria[0].reference", "`os`"),
        ({**EXACT, "operation": "regex"}, "testing_criteria[0].operation", "eq"),
        (JUDGE_NOWHERE, "testing_criteria[0].model", "nope/nothing"),
    ],
)
def test_a_bad_eval_is_refused_naming_its_field(served, criteria, param, needle):
    body = {"data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [criteria]}
    resp = served[0].post("/v1/evals", json=body)
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and (error["param"] or "").startswith(param.split(".")[0]), error
    if "[" in param:
        assert param in (error["param"] or "") + error["message"], error


def test_eval_level_checks(served):
    client, _ = served
    bad_schema = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    for config, needle in [
        ({"type": "custom", "item_schema": bad_schema}, "not a valid JSON schema"),
        ({"type": "custom", "item_schema": {"type": "array"}}, "object"),
        ({"type": "custom"}, "item_schema"),
    ]:
        resp = client.post("/v1/evals", json={"data_source_config": config, "testing_criteria": [EXACT]})
        assert resp.status_code == 400 and needle in resp.json()["error"]["message"], resp.text
    resp = client.post(
        "/v1/evals",
        json={"data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [EXACT, EXACT]},
    )
    assert resp.status_code == 400 and "distinct" in resp.json()["error"]["message"]


def test_a_bad_run_is_refused_naming_its_row_or_line(served, tmp_path, tiny_model_dir):
    client, _ = served
    ev = _eval(client)
    runs = f"/v1/evals/{ev['id']}/runs"

    def content(rows):
        return {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": rows}}}

    good = {"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}
    resp = client.post(runs, json=content([good, {"item": {"question": "q"}, "sample": {}}]))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "data_source.source.content[1]"
    assert "'answer' is a required property" in resp.json()["error"]["message"]
    resp = client.post(runs, json=content([{"item": {"question": "q", "answer": "a"}}]))  # graders read `sample`
    assert resp.status_code == 400 and "sample" in resp.json()["error"]["message"]
    # an uploaded file: a line that is not JSON, a wrong purpose
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with open(path, "rb") as handle:
        file_id = client.post("/v1/files", files={"file": ("rows.jsonl", handle)}, data={"purpose": "evals"}).json()
    source = {"type": "jsonl", "source": {"type": "file_id", "id": file_id["id"]}}
    resp = client.post(runs, json={"data_source": source})
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("line 2 of the file"), resp.text
    completions = {
        "type": "completions",
        "model": str(tiny_model_dir),
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{ sample.output_text }}"}]},
        "source": {"type": "file_content", "content": [good]},
    }
    resp = client.post(runs, json={"data_source": completions})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "data_source.input_messages.template[0].content"
    completions["input_messages"] = {"type": "item_reference", "item_reference": "item.question"}
    completions["sampling_params"] = {"response_format": {"type": "json_schema"}}
    resp = client.post(runs, json={"data_source": completions})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith("data_source.sampling_params.response_format"), resp.text
    completions["sampling_params"], completions["model"] = {}, "nope/nothing"
    resp = client.post(runs, json={"data_source": completions})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "data_source.model"
    assert client.get(runs).json()["data"] == []  # nothing was created


def test_cancel_keeps_what_was_graded_and_deletes_wait_for_the_end(served):
    client, model = served
    ev = _eval(client, (EXACT,))
    rows = [{"item": {"question": f"Count to {n}.", "answer": "x"}} for n in range(400)]
    data_source = {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "item_reference", "item_reference": "item.question"},
        "sampling_params": {"temperature": 0.7, "seed": 3, "max_completion_tokens": 24},
        "source": {"type": "file_content", "content": rows},
    }
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": data_source}).json()
    wait_until(lambda: _items(client, ev["id"], run["id"]), 240, what="the first graded rows")
    going = client.delete(f"/v1/evals/{ev['id']}")
    assert going.status_code == 409 and going.json()["error"]["code"] == "eval_in_use"
    assert client.delete(f"/v1/evals/{ev['id']}/runs/{run['id']}").status_code == 409
    in_use = client.delete(f"/v1/models/{model}")
    assert in_use.status_code == 409 and run["id"] in in_use.json()["error"]["message"], in_use.text
    cancelled = client.post(f"/v1/evals/{ev['id']}/runs/{run['id']}")
    assert cancelled.status_code == 200, cancelled.text
    done = _ended(client, ev["id"], run["id"])
    assert done["status"] == "canceled"
    graded = _items(client, ev["id"], run["id"], limit=100)
    counts = done["result_counts"]
    assert counts["total"] == 400 and 0 < counts["passed"] + counts["failed"] + counts["errored"] < 400
    assert counts["passed"] + counts["failed"] + counts["errored"] == len(_all_items(client, ev["id"], run["id"]))
    assert graded[0]["sample"]["seed"] == 3 and graded[0]["sample"]["temperature"] == 0.7
    assert client.post(f"/v1/evals/{ev['id']}/runs/{run['id']}").status_code == 400  # ended: not cancellable
    assert client.get(f"/v1/evals/{ev['id']}/runs", params={"status": "canceled"}).json()["data"][0]["id"] == run["id"]
    deleted = client.delete(f"/v1/evals/{ev['id']}/runs/{run['id']}").json()
    assert deleted == {"object": "eval.run.deleted", "deleted": True, "run_id": run["id"]}
    assert client.get(f"/v1/evals/{ev['id']}/runs/{run['id']}").status_code == 404
    gone = client.delete(f"/v1/evals/{ev['id']}").json()
    assert gone == {"object": "eval.deleted", "deleted": True, "eval_id": ev["id"]}
    assert client.get(f"/v1/evals/{ev['id']}").status_code == 404


def test_a_run_killed_mid_way_goes_on_without_grading_a_row_twice(served):
    client, model = served
    ev = _eval(client, (EXACT,))
    rows = [{"item": {"question": f"Count to {n}.", "answer": "x"}} for n in range(120)]
    data_source = {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "item_reference", "item_reference": "item.question"},
        "sampling_params": {"temperature": 0.7, "seed": 5, "max_completion_tokens": 16},  # sampled: row by row
        "source": {"type": "file_content", "content": rows},
    }
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": data_source}).json()
    wait_until(lambda: _items(client, ev["id"], run["id"]), 240, what="the first graded rows")
    job = client.app.state.job_manager.jobs.get(run["id"])
    assert job.status == "running", job.status  # still under way: the kill stops it half-way
    os.kill(job.pid, signal.SIGKILL)  # a crash: no outcome, no cancel
    done = _ended(client, ev["id"], run["id"])
    assert done["status"] == "completed", done
    items = _all_items(client, ev["id"], run["id"])
    assert sorted(i["datasource_item_id"] for i in items) == list(range(120))  # each row once
    counts = done["result_counts"]
    assert counts["total"] == 120 and counts["passed"] + counts["failed"] + counts["errored"] == 120
    sampled = sum(i["sample"]["usage"]["completion_tokens"] for i in items)
    assert done["per_model_usage"][0]["completion_tokens"] == sampled  # the rows before the crash counted once
    events, _ = client.app.state.eval_service.events.list_events(run["id"], limit=200)
    messages = [e.message for e in events]
    assert any(m.startswith("Interrupted: the job process died") for m in messages)
    assert any(m.startswith("resuming: ") and m.endswith(" of 120 rows already graded") for m in messages)


def _all_items(client, eval_id: str, run_id: str) -> list[dict]:
    items, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/evals/{eval_id}/runs/{run_id}/output_items", params=params).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def test_another_project_sees_no_eval_run_or_item(served):
    client, _ = served
    ev = _eval(client, metadata={"team": "a"})
    row = {"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}
    source = {"type": "jsonl", "source": {"type": "file_content", "content": [row]}}
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": source}).json()
    done = _ended(client, ev["id"], run["id"])
    item = _items(client, ev["id"], run["id"])[0]
    for path in (
        f"/v1/evals/{ev['id']}",
        f"/v1/evals/{ev['id']}/runs",
        f"/v1/evals/{ev['id']}/runs/{done['id']}",
        f"/v1/evals/{ev['id']}/runs/{done['id']}/output_items/{item['id']}",
    ):
        assert client.get(path, headers=BOB).status_code == 404, path
    assert ev["id"] not in [e["id"] for e in client.get("/v1/evals", headers=BOB).json()["data"]]
    assert client.delete(f"/v1/evals/{ev['id']}", headers=BOB).status_code == 404
    # update, and list by last update
    updated = client.post(f"/v1/evals/{ev['id']}", json={"name": "renamed", "metadata": {"team": "b"}}).json()
    assert updated["name"] == "renamed" and updated["metadata"] == {"team": "b"}
    newest = client.get("/v1/evals", params={"order": "desc", "order_by": "updated_at", "limit": 1}).json()
    assert newest["data"][0]["id"] == ev["id"]


def test_the_openai_sdk_runs_an_eval_on_a_real_server(sdk, tmp_path: Path, tiny_model_dir):
    client = sdk
    with open(write_json(tmp_path / "train.json", alpaca_records(8)), "rb") as handle:
        training = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=training.id, extra_body={"Training": {"max_train_steps": 2}}
    )
    tuned = sdk_job_end(client, job.id)
    assert tuned.status == "succeeded", tuned.error
    ev = client.evals.create(
        name="sdk",
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=[
            {**EXACT, "operation": "ilike"},
            {**FUZZY, "evaluation_metric": "rouge_l", "pass_threshold": 0.5},
        ],
    )
    assert ev.object == "eval" and ev.data_source_config.type == "custom"
    path = tmp_path / "rows.jsonl"
    questions = ["Say red.", "Say blue.", "Say green."]
    lines = [{"item": {"question": q, "answer": q.split()[1][:-1]}} for q in questions]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    with open(path, "rb") as handle:
        rows = client.files.create(file=handle, purpose="evals")
    run = client.evals.runs.create(
        ev.id,
        name="tiny",
        data_source={
            "type": "completions",
            "model": tuned.fine_tuned_model,
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{ item.question }}"}]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 4},
            "source": {"type": "file_id", "id": rows.id},
        },
    )
    assert run.object == "eval.run" and run.name == "tiny"
    done = wait_until(
        lambda: (r := client.evals.runs.retrieve(run.id, eval_id=ev.id)).status in ("completed", "failed") and r,
        240,
        what="the run",
    )
    assert done.status == "completed", done.error
    assert done.result_counts.total == 3 and done.result_counts.errored == 0
    assert [r.testing_criteria for r in done.per_testing_criteria_results] == ["exact", "fuzzy"]
    items = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    assert sorted(i.datasource_item_id for i in items) == [0, 1, 2]
    for item in items:
        text = item.sample.output[0].content or ""
        exact = next(r for r in item.results if r.name == "exact")
        assert exact.passed == (item.datasource_item["answer"].lower() in text.lower())
    assert ev.id in [e.id for e in client.evals.list()]
    assert run.id in [r.id for r in client.evals.runs.list(ev.id)]
    # stored chat completions through the SDK's own methods
    kept = client.chat.completions.create(
        model=tuned.fine_tuned_model,
        messages=[{"role": "user", "content": "Say red."}],
        max_tokens=3,
        store=True,
        metadata={"from": "sdk"},
    )
    listed = client.chat.completions.list(metadata={"from": "sdk"})
    assert [c.id for c in listed] == [kept.id]
    assert client.chat.completions.retrieve(kept.id).choices[0].message.content == kept.choices[0].message.content
    assert [m.content for m in client.chat.completions.messages.list(kept.id)] == ["Say red."]
    assert client.chat.completions.update(kept.id, metadata={"from": "x"}).metadata == {"from": "x"}
    assert client.chat.completions.delete(kept.id).deleted
    graded = client.fine_tuning.alpha.graders.run(grader=FUZZY, model_sample="hallo", item={"answer": "hello"})
    assert graded.reward == pytest.approx(0.8)
    assert client.fine_tuning.alpha.graders.validate(grader=EXACT).grader.name == "exact"
    multi = client.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="hallo", item={"answer": "hello"})
    assert multi.reward == pytest.approx(0.32) and multi.sub_rewards == {"exact": 0.0, "fuzzy": pytest.approx(0.8)}
    # the rows' file is read by the run: deleting it once the run has ended works
    assert client.files.delete(rows.id).deleted


def test_the_graders_api_checks_and_runs_one_grader(served, tiny_model_dir):
    client, _ = served
    graders = "/v1/fine_tuning/alpha/graders"
    assert client.post(f"{graders}/validate", json={"grader": FUZZY}).json() == {"grader": FUZZY}
    for grader, param in [
        ({"type": "python", "name": "p", "source": "x"}, "grader.type"),
        ({**EXACT, "input": "{{ nope }}"}, "grader.input"),
        ({**JUDGE_NOWHERE}, "grader.model"),
    ]:
        resp = client.post(f"{graders}/validate", json={"grader": grader})
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text

    def run(grader, sample, item=None):
        resp = client.post(f"{graders}/run", json={"grader": grader, "model_sample": sample, "item": item})
        assert resp.status_code == 200, resp.text
        return resp.json()

    assert run(EXACT, "hello", {"answer": "hello"})["reward"] == 1.0
    fuzzy = run(FUZZY, "hallo", {"answer": "hello"})
    assert fuzzy["reward"] == pytest.approx(0.8) and fuzzy["metadata"]["scores"] == {"fuzzy": fuzzy["reward"]}
    missing = run(EXACT, "hello", {"question": "no answer field"})
    assert missing["reward"] == 0.0 and missing["metadata"]["errors"]["invalid_variable_error"]
    long = run(FUZZY, "a" * 100_001, {"answer": "a"})  # past the similarity bound: no minutes of CPU
    assert long["reward"] == 0.0 and long["metadata"]["errors"]["other_error"]
    base = str(tiny_model_dir)
    judge = {**JUDGE_NOWHERE, "model": base, "input": [{"role": "user", "content": "{{ sample.output_text }}?"}]}
    judged = run(judge, "Paris")
    assert judged["reward"] in (0.0, 1.0) and not any(v for v in judged["metadata"]["errors"].values())
    usage = judged["model_grader_token_usage_per_model"][base]
    assert usage["completion_tokens"] > 0 and judged["metadata"]["token_usage"] == usage["total_tokens"]


MULTI = {
    "type": "multi",
    "name": "blend",
    "graders": {"exact": EXACT, "fuzzy": FUZZY},
    "calculate_output": "0.5 * exact + 0.5 * fuzzy ^ 2",
}


def test_the_graders_api_runs_a_multi_grader_by_its_formula(served, tiny_model_dir):
    client, _ = served
    graders = "/v1/fine_tuning/alpha/graders"
    assert client.post(f"{graders}/validate", json={"grader": MULTI}).json() == {"grader": MULTI}
    resp = client.post(f"{graders}/run", json={"grader": MULTI, "model_sample": "hallo", "item": {"answer": "hello"}})
    assert resp.status_code == 200, resp.text
    run = resp.json()
    assert run["sub_rewards"] == {"exact": 0.0, "fuzzy": pytest.approx(0.8)}  # by the names the formula reads
    assert run["reward"] == pytest.approx(0.5 * 0.8**2) and run["metadata"]["type"] == "multi"
    assert run["metadata"]["scores"] == run["sub_rewards"]
    # A judge among the graders answers too; a formula without a value (0 / 0) is an error flag, not a 500.
    judge = {**JUDGE_NOWHERE, "model": str(tiny_model_dir), "input": [{"role": "user", "content": "Is it red?"}]}
    ratio = {**MULTI, "graders": {"exact": EXACT, "judge": judge}, "calculate_output": "exact / judge"}
    resp = client.post(f"{graders}/run", json={"grader": ratio, "model_sample": "blue", "item": {"answer": "red"}})
    run = resp.json()
    assert resp.status_code == 200 and set(run["sub_rewards"]) == {"exact", "judge"}, resp.text
    assert run["model_grader_token_usage_per_model"][str(tiny_model_dir)]["completion_tokens"] > 0
    if run["sub_rewards"]["judge"] == 0.0:
        assert run["reward"] == 0.0 and run["metadata"]["errors"]["other_error"]
    else:
        assert run["reward"] == 0.0 and not run["metadata"]["errors"]["other_error"]  # 0 / 1
    one = {**MULTI, "graders": FUZZY, "calculate_output": "1 - fuzzy"}  # one grader, read by its name
    resp = client.post(f"{graders}/run", json={"grader": one, "model_sample": "hallo", "item": {"answer": "hello"}})
    assert resp.json()["reward"] == pytest.approx(0.2), resp.text


CALC = "grader.calculate_output"
AT = "grader.graders"


@pytest.mark.parametrize(
    ("grader", "param", "needle"),
    [
        ({**MULTI, "calculate_output": "exact + close"}, CALC, "reads `close`, which is not one of `graders`"),
        ({**MULTI, "calculate_output": "exact.real"}, CALC, "not `exact.real`"),
        ({**MULTI, "calculate_output": "open('x')"}, CALC, "`open(…)` is not a function"),
        ({**MULTI, "graders": {"my grader": EXACT}}, AT, "'my grader' is not a name a formula"),
        ({**MULTI, "graders": {"p": {"type": "python", "source": "x"}}}, "grader.graders.p.type", "run the client"),
        ({**MULTI, "graders": {"m": MULTI}}, "grader.graders.m.type", "not multi graders"),
        ({**MULTI, "graders": {"j": JUDGE_NOWHERE}, "calculate_output": "j"}, "grader.graders.j.model", "nope"),
        ({**MULTI, "graders": {"e": {**EXACT, "input": "{{ x }}"}}, "calculate_output": "e"}, f"{AT}.e.input", "`x`"),
        ({**MULTI, "graders": {}}, AT, "at least 1"),
    ],
)
def test_a_bad_multi_grader_is_refused_naming_its_field(served, grader, param, needle):
    resp = served[0].post("/v1/fine_tuning/alpha/graders/validate", json={"grader": grader})
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["param"] == param, error


def test_an_eval_refuses_a_multi_grader_saying_where_it_is_offered(served):
    body = {"data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [MULTI]}
    resp = served[0].post("/v1/evals", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "testing_criteria[0].type" and "reinforcement fine-tuning" in error["message"], error


def _chat(client, model: str, content: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 4}
    resp = client.post("/v1/chat/completions", json={**body, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json() if not extra.get("stream") else resp.text


def test_stored_chat_completions_are_listed_and_evaluated(served, tiny_model_dir):
    client, model = served
    base = str(tiny_model_dir)
    bad = client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}], "metadata": {}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata"
    tag = {"use": "stored-test"}
    kept = [_chat(client, model, q, store=True, metadata=tag) for q in QUESTIONS[:2]]
    _chat(client, model, "not kept")
    stream = _chat(client, model, QUESTIONS[2], store=True, metadata=tag, stream=True)
    streamed_id = json.loads(stream.split("\n\n")[0].removeprefix("data: "))["id"]
    listed = client.get("/v1/chat/completions", params={"metadata[use]": "stored-test"}).json()
    assert [c["id"] for c in listed["data"]] == [kept[0]["id"], kept[1]["id"], streamed_id]
    assert listed["data"][0]["choices"] == kept[0]["choices"] and listed["data"][0]["metadata"] == tag
    streamed = client.get(f"/v1/chat/completions/{streamed_id}").json()
    text = "".join(
        (json.loads(e.removeprefix("data: "))["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for e in stream.split("\n\n")
        if e.startswith("data: {")
    )
    assert streamed["choices"][0]["message"]["content"] == text  # what the stream sent, whole
    messages = client.get(f"/v1/chat/completions/{kept[0]['id']}/messages").json()["data"]
    assert messages == [{"id": f"{kept[0]['id']}-0", "role": "user", "content": QUESTIONS[0]}]
    assert client.get("/v1/chat/completions", params={"model": "other"}).json()["data"] == []
    assert client.get(f"/v1/chat/completions/{kept[0]['id']}", headers=BOB).status_code == 404
    updated = client.post(f"/v1/chat/completions/{kept[1]['id']}", json={"metadata": {"use": "other"}}).json()
    assert updated["metadata"] == {"use": "other"}
    # an eval over the stored completions: their own answers graded, then the base model answering them
    same = {**EXACT, "reference": "{{ item.output }}"}
    ev = client.post(
        "/v1/evals",
        json={"data_source_config": {"type": "stored_completions", "metadata": tag}, "testing_criteria": [same]},
    ).json()
    stored = {"type": "stored_completions"}  # the eval's metadata selects: kept[1] was relabelled
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": {"type": "completions", "source": stored}})
    assert run.status_code == 200, run.text
    done = _ended(client, ev["id"], run.json()["id"])
    assert done["result_counts"] == {"total": 2, "errored": 0, "failed": 0, "passed": 2}, done
    items = _items(client, ev["id"], done["id"])
    assert [i["datasource_item"]["id"] for i in items] == [kept[0]["id"], streamed_id]
    assert items[0]["datasource_item"]["input"] == [{"role": "user", "content": QUESTIONS[0]}]
    again = {"type": "completions", "model": base, "source": stored, "sampling_params": {"temperature": 0}}
    again["sampling_params"]["max_completion_tokens"] = 4
    run = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": again}).json()
    done = _ended(client, ev["id"], run["id"])
    assert done["status"] == "completed" and done["result_counts"]["errored"] == 0, done
    for item in _items(client, ev["id"], done["id"]):
        answer = _chat(client, base, item["datasource_item"]["input"][0]["content"])
        assert item["sample"]["output"][0]["content"] == answer["choices"][0]["message"]["content"]
        assert item["status"] == (
            "pass" if answer["choices"][0]["message"]["content"] == item["datasource_item"]["output"] else "fail"
        )
    gone = client.delete(f"/v1/chat/completions/{kept[0]['id']}").json()
    assert gone == {"object": "chat.completion.deleted", "id": kept[0]["id"], "deleted": True}
    assert client.get(f"/v1/chat/completions/{kept[0]['id']}").status_code == 404
    nothing = {"type": "completions", "source": {"type": "stored_completions", "model": "nope"}}
    resp = client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": nothing})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "data_source.source"
