"""Function calling on /v1/chat/completions, end to end: the real app, a real fine-tuning job on chat
records with tools (OpenAI's fine-tuning form) and the engine on a tiny random Llama.

A tiny model fine-tuned on calls of ``get_weather`` makes that call when tools are offered
(``tool_choice`` auto), as a parsed ``tool_calls`` entry, whole or streamed; the base model, whose
answers are noise, still makes a well-formed call whose arguments fit the schema when a call is
required, because a required call is generated under its grammar.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from bench.tiny_llama import make_tiny_llama
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from tests.helpers import alpaca_records, write_json, write_jsonl
from tests.integration.conftest import make_settings, wait_status

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "integer"}}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _train(client: TestClient, path, model: str) -> dict:
    with open(path, "rb") as handle:
        uploaded = client.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"})
    assert uploaded.status_code == 200, uploaded.text
    body = {
        "model": model,
        "training_file": uploaded.json()["id"],
        "Training": {"batch_size": 4, "epochs": 8, "learning_rate": 2e-2},
        "General": {"lora_config": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.0}},
    }
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    return done


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """The app, the base model's name, a model fine-tuned on tool calls and one fine-tuned on Alpaca.

    The base is wider than the shared tiny Llama (64, not 16) and initialised larger: the shared one's
    logits are nearly flat, and LoRA alone can't make it say a 20-token call; this one learns it in ~20
    steps (training loss 13 → 0.04)."""
    root = tmp_path_factory.mktemp("tools")
    base = root / "tiny-llama-64"
    make_tiny_llama(len(tokenizer), hidden_size=64, intermediate_size=128, initializer_range=0.3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    record = {"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}]}
    with TestClient(create_app(make_settings(root / "data", inference_threads=1))) as client:
        tooled = _train(client, write_jsonl(root / "calls.jsonl", [record] * 16), str(base))
        alpaca = _train(client, write_json(root / "a.json", alpaca_records(4)), str(base))
        yield client, str(base), tooled["fine_tuned_model"], alpaca["fine_tuned_model"]


def _chat(client: TestClient, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"max_tokens": 48, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _streamed(client: TestClient, **body) -> tuple[str, list[dict], str | None]:
    """A streamed answer's content, its calls (joined from their deltas, as the SDK joins them) and finish."""
    content, calls, finish = "", {}, None
    with client.stream(
        "POST", "/v1/chat/completions", json={"max_tokens": 48, "temperature": 0, "stream": True, **body}
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            content += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls") or ():
                joined = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                joined["name"] += call["function"].get("name") or ""
                joined["arguments"] += call["function"].get("arguments") or ""
                assert call["id"].startswith("call_") and call["type"] == "function"
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_a_model_fine_tuned_on_calls_calls_the_tool_when_offered(served):
    client, _, tooled, _ = served
    answer = _chat(client, model=tooled, messages=ASK, tools=[WEATHER])
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    content, calls, finish = _streamed(client, model=tooled, messages=ASK, tools=[WEATHER])
    assert (content, calls, finish) == ("", [call["function"]], "tool_calls")

    # With log-probabilities: the call's tokens are scored, streamed with the call as they are whole.
    scored = _chat(client, model=tooled, messages=ASK, tools=[WEATHER], logprobs=True)["choices"][0]
    tokens = [t["token"] for t in scored["logprobs"]["content"]]
    assert scored["message"]["tool_calls"] and "".join(tokens).startswith("<tool_call>")
    streamed_tokens = []
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": tooled,
            "messages": ASK,
            "tools": [WEATHER],
            "logprobs": True,
            "temperature": 0,
            "max_tokens": 48,
            "stream": True,
        },
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed_tokens += [t["token"] for t in (choice["logprobs"] or {}).get("content") or ()]
    assert streamed_tokens == tokens

    # tool_choice none: the same answer, as text.
    plain = _chat(client, model=tooled, messages=ASK, tools=[WEATHER], tool_choice="none")["choices"][0]
    assert plain["message"]["tool_calls"] is None and plain["finish_reason"] == "stop"
    assert json.loads(plain["message"]["content"].strip().removeprefix("<tool_call>").removesuffix("</tool_call>")) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    # No tools offered: nothing is parsed either.
    assert _chat(client, model=tooled, messages=ASK)["choices"][0]["message"]["tool_calls"] is None

    # The call's result sent back: the conversation renders and is answered.
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"},
    ]
    follow = _chat(client, model=tooled, messages=turns, tools=[WEATHER], max_tokens=4)
    assert follow["usage"]["prompt_tokens"] > answer["usage"]["prompt_tokens"]


def test_a_required_call_fits_its_schema_even_from_a_random_model(served):
    client, base, _, _ = served
    schema = WEATHER["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        body = {"model": base, "messages": ASK, "tools": [TIME, WEATHER], "tool_choice": choice, "max_tokens": 96}
        (got,) = _chat(client, **body, parallel_tool_calls=False)["choices"]
        assert got["finish_reason"] == "tool_calls", got
        (call,) = got["message"]["tool_calls"]
        if isinstance(choice, dict):
            assert call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        spec = WEATHER if call["function"]["name"] == "get_weather" else TIME
        jsonschema.validate(arguments, spec["function"]["parameters"])
        _, calls, finish = _streamed(client, **body, parallel_tool_calls=False)
        assert (calls, finish) == ([call["function"]], "tool_calls")
    sampled = _chat(
        client,
        model=base,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=1.0,
        n=3,
        seed=5,
        max_tokens=96,
    )
    for got in sampled["choices"]:
        for call in got["message"]["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "needs `tools`"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}
                ]
            },
            "tools[0].function.parameters",
            "not supported",
        ),
        ({"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "1"}]}, "messages", "call_9"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(served, body, param, says):
    client, base, _, _ = served
    response = client.post("/v1/chat/completions", json={"model": base, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_model_fine_tuned_on_alpaca_takes_no_tools(served):
    client, _, _, alpaca = served
    response = client.post("/v1/chat/completions", json={"model": alpaca, "messages": ASK, "tools": [WEATHER]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_a_bad_tool_record_is_refused_at_upload_naming_its_line(served, tmp_path):
    client, _, _, _ = served
    good = {"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "tool_calls": [CALL]}]}
    bad = {"messages": [*ASK, {"role": "assistant", "tool_calls": [CALL]}]}  # calls a tool it doesn't define
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with open(path, "rb") as handle:
        response = client.post("/v1/files", files={"file": ("bad.jsonl", handle)}, data={"purpose": "fine-tune"})
    assert response.status_code == 400
    assert "'bad.jsonl': line 2: messages[1] calls 'get_weather'" in response.json()["error"]["message"]


def _flat(tool: dict) -> dict:
    """A chat tool in the Responses API's flat form."""
    return {"type": "function", **tool["function"]}


def test_the_responses_api_makes_calls_as_function_call_items_and_takes_their_outputs(served):
    client, _, tooled, _ = served
    body = {
        "model": tooled,
        "input": ASK[0]["content"],
        "tools": [_flat(WEATHER)],
        "temperature": 0,
        "max_output_tokens": 48,
    }
    made = client.post("/v1/responses", json=body)
    assert made.status_code == 200, made.text
    response = made.json()
    assert response["status"] == "completed" and response["tool_choice"] == "auto"
    assert response["tools"][0]["name"] == "get_weather"
    (call,) = response["output"]
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Paris"}')
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")

    # Streamed: the same call, as Responses' events; no message item (the answer has no text).
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[4]["arguments"] == call["arguments"] and events[-1]["response"]["output"][0]["name"] == "get_weather"

    # The result sent back, by previous_response_id: the stored conversation holds the call it answers.
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "18 C"}
    follow = client.post(
        "/v1/responses",
        json={**body, "input": [result], "previous_response_id": response["id"], "max_output_tokens": 4},
    )
    assert follow.status_code == 200, follow.text
    assert follow.json()["usage"]["input_tokens"] > response["usage"]["input_tokens"]
    listed = client.get(f"/v1/responses/{follow.json()['id']}/input_items").json()["data"]
    assert listed[0]["type"] == "function_call_output" and listed[0]["id"].startswith("fco_")
    # ... or sent whole, call and result: the same prompt.
    whole = client.post(
        "/v1/responses",
        json={**body, "input": [{"role": "user", "content": ASK[0]["content"]}, call, result], "max_output_tokens": 4},
    )
    assert whole.json()["usage"]["input_tokens"] == follow.json()["usage"]["input_tokens"]
    # A result of no call is a 400 naming the input.
    lost = client.post("/v1/responses", json={**body, "input": [{**result, "call_id": "call_x"}]})
    assert lost.status_code == 400 and lost.json()["error"]["param"] == "input", lost.text
