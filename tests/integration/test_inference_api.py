"""/v1/models, /v1/chat/completions, /v1/completions: the real app, real job processes, a tiny Llama.

Two projects (API keys). Alice trains an Alpaca job (high learning rate, so its LoRA B matrices move
far from zero) and a chat job, and merges the first. Assertions are about structure and behaviour
(shapes, token counts, determinism, stop, streaming = non-streaming), never about text quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.store.jobs import JobStore
from sqft_service.training.prompts import alpaca_prompt
from tests.helpers import CHAT, alpaca_records, write_json, write_jsonl
from tests.integration.conftest import make_settings, wait_status

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
ASK = [{"role": "user", "content": "Repeat the word red."}]


def _upload(client: TestClient, path: Path) -> str:
    with open(path, "rb") as handle:
        resp = client.post(
            "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}, headers=ALICE
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _train(client: TestClient, model_dir: Path, file_id: str, **extra) -> dict:
    body = {
        "model": str(model_dir),
        "training_file": file_id,
        "Training": {"batch_size": 4, "epochs": 2, "learning_rate": 5e-2},
        "General": {"lora_config": {"r": 4, "lora_alpha": 16}},
        **extra,
    }
    resp = client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("inference")
    settings = make_settings(root / "data", api_key="alice:ka,bob:kb", inference_threads=1)
    # Alice's key by default (wait_status polls without headers); Bob's requests override it.
    with TestClient(create_app(settings), headers=ALICE) as client:
        alpaca = _train(client, tiny_model_dir, _upload(client, write_json(root / "a.json", alpaca_records(16))))
        chat = _train(
            client, tiny_model_dir, _upload(client, write_jsonl(root / "c.jsonl", [CHAT] * 8)), suffix="talk:v1"
        )
        jobs = {}
        for name, job in (("alpaca", alpaca), ("chat", chat)):
            done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
            assert done["status"] == "succeeded", done["error"]
            jobs[name] = done
        merged = client.post("/v1/finetune/merge_adapter", json={"fine_tuning_job_id": alpaca["id"]}, headers=ALICE)
        assert merged.status_code == 200, merged.text
        yield client, jobs


def _chat(client, model, headers=ALICE, **body):
    return client.post("/v1/chat/completions", json={"model": model, "messages": ASK, **body}, headers=headers)


def _complete(client, model, headers=ALICE, **body):
    return client.post("/v1/completions", json={"model": model, "prompt": "The sky is", **body}, headers=headers)


def _events(resp) -> list:
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    lines = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_jobs_are_named_openai_style_and_models_lists_them(served, tiny_model_dir):
    client, jobs = served
    alpaca, chat = jobs["alpaca"], jobs["chat"]
    assert alpaca["fine_tuned_model"] == f"ft:{tiny_model_dir.name}:sqft:{alpaca['id']}"
    assert chat["fine_tuned_model"] == f"ft:{tiny_model_dir.name}:talk-v1:{chat['id']}"  # ':' is kept out
    assert Path(alpaca["fine_tuned_model_path"], "adapter_config.json").is_file()
    # The job records how it rendered its records, for inference to render prompts alike.
    stored = JobStore(client.app.state.db)
    assert [stored.get(j["id"]).result["data_format"] for j in (alpaca, chat)] == ["alpaca", "chat"]

    listed = client.get("/v1/models", headers=ALICE).json()
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    merged = f"{alpaca['fine_tuned_model']}:merged"
    assert set(by_id) == {str(tiny_model_dir), alpaca["fine_tuned_model"], chat["fine_tuned_model"], merged}
    assert by_id[str(tiny_model_dir)]["owned_by"] == "system"
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listed["data"])
    assert by_id[merged]["path"].endswith("/output/merged_model") and by_id[merged]["owned_by"] == "alice"

    one = client.get(f"/v1/models/{alpaca['fine_tuned_model']}", headers=ALICE)
    assert one.status_code == 200 and one.json()["fine_tuning_job_id"] == alpaca["id"]
    assert client.get(f"/v1/models/{tiny_model_dir}", headers=ALICE).json()["id"] == str(tiny_model_dir)
    # Bob sees none of Alice's models, not even her base model, and cannot name them.
    assert client.get("/v1/models", headers=BOB).json()["data"] == []
    other = client.get(f"/v1/models/{alpaca['fine_tuned_model']}", headers=BOB)
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"
    assert _chat(client, alpaca["fine_tuned_model"], headers=BOB).status_code == 404
    # The job id alone does not make a name: the base and suffix must be the job's.
    assert client.get(f"/v1/models/ft:x:sqft:{alpaca['id']}", headers=ALICE).status_code == 404


def test_chat_answers_in_openai_shape_rendered_as_in_training(served, tokenizer):
    client, jobs = served
    resp = _chat(client, jobs["alpaca"]["fine_tuned_model"], max_tokens=5, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == jobs["alpaca"]["fine_tuned_model"]
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    # The Alpaca job's model sees the Alpaca template it trained with.
    expected = tokenizer(alpaca_prompt({"instruction": ASK[0]["content"]}), add_special_tokens=False)["input_ids"]
    assert usage["prompt_tokens"] == len(expected)
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # The chat job's model sees the chat template with the generation prompt.
    resp = _chat(client, jobs["chat"]["fine_tuned_model"], max_tokens=2, temperature=0)
    rendered = tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    assert resp.json()["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    # Alpaca has no system prompt or turns: refused, naming the field, rather than rendered unlike training.
    with_system = [{"role": "system", "content": "Be brief."}, *ASK]
    resp = client.post(
        "/v1/chat/completions",
        json={"model": jobs["alpaca"]["fine_tuned_model"], "messages": with_system},
        headers=ALICE,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


def test_max_tokens_seed_n_and_stop(served):
    client, jobs = served
    model = jobs["alpaca"]["fine_tuned_model"]
    long = _complete(client, model, max_tokens=12, temperature=0).json()
    (choice,) = long["choices"]
    assert long["object"] == "text_completion" and long["usage"]["completion_tokens"] <= 12
    short = _complete(client, model, max_tokens=3, temperature=0).json()["choices"][0]
    assert short["finish_reason"] == "length" and long["choices"][0]["text"].startswith(short["text"])

    sampled = [_complete(client, model, max_tokens=8, temperature=1.0, seed=11).json() for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]

    two = _chat(client, model, n=2, max_tokens=4, temperature=1.0, seed=3).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert 2 <= two["usage"]["completion_tokens"] <= 8  # both choices counted, each at most max_tokens

    text = choice["text"]
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = _complete(client, model, max_tokens=12, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"

    listed = client.post(
        "/v1/completions", json={"model": model, "prompt": ["a", "b"], "max_tokens": 2}, headers=ALICE
    ).json()
    assert [c["index"] for c in listed["choices"]] == [0, 1]


def test_streaming_concatenates_to_the_greedy_answer(served):
    client, jobs = served
    model = jobs["alpaca"]["fine_tuned_model"]
    whole = _chat(client, model, max_tokens=10, temperature=0).json()
    resp = _chat(client, model, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = _events(resp)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    plain = _complete(client, model, max_tokens=10, temperature=0).json()["choices"][0]["text"]
    streamed = _events(_complete(client, model, max_tokens=10, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed) == plain


def _per_choice(chunks: list, n: int, kind: str) -> tuple[list[str], list[str | None]]:
    """Each choice's text and finish reason, gathered by ``index`` from interleaved chunks."""
    texts, finishes = [""] * n, [None] * n
    for c in chunks:
        for choice in c["choices"]:
            piece = choice["delta"].get("content") if kind == "chat" else choice["text"]
            texts[choice["index"]] += piece or ""
            if choice["finish_reason"] is not None:
                assert finishes[choice["index"]] is None  # one finishing chunk per choice
                finishes[choice["index"]] = choice["finish_reason"]
    return texts, finishes


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_n_choices_equals_the_whole_answer(served, kind):
    client, jobs = served
    send = _chat if kind == "chat" else _complete
    model = jobs["alpaca"]["fine_tuned_model"]
    # Sampled with a seed, and with a stop string: the choices differ and end differently.
    args = {"n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 5}
    whole = send(client, model, **args).json()
    expected = [c["message"]["content"] if kind == "chat" else c["text"] for c in whole["choices"]]
    assert len(set(expected)) > 1, expected  # three different samples, or the test proves little
    chunks = _events(send(client, model, **args, stream=True, stream_options={"include_usage": True}))
    assert {choice["index"] for c in chunks for choice in c["choices"]} == {0, 1, 2}
    if kind == "chat":  # each choice opens with its role
        roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert roles == [0, 1, 2]
    texts, finishes = _per_choice(chunks[:-1], 3, kind)
    assert texts == expected
    assert finishes == [c["finish_reason"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_greedy_choices_are_generated_once_and_given_to_each(served, tiny_model_dir):
    """n greedy choices are n copies of the one greedy answer (each step the argmax of the same history),
    so the engine generates one row: every forward has batch 1, and the usage still counts every choice."""
    client, _ = served
    model = str(tiny_model_dir)
    args = {"max_tokens": 6, "temperature": 0, "logprobs": 2, "frequency_penalty": 0.5}
    one = _complete(client, model, **args).json()
    engine = client.app.state.inference_service.engine
    [loaded] = [m for key, m in engine._models.items() if Path(key).resolve() == Path(model).resolve()]
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    batches: list[int] = []
    hook = base.register_forward_pre_hook(lambda _m, _a, kw: batches.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        three = _complete(client, model, **args, n=3).json()
        chunks = _events(_complete(client, model, **args, n=3, stream=True, stream_options={"include_usage": True}))
    finally:
        hook.remove()
    assert batches and set(batches) == {1}
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    for choice in three["choices"]:
        assert {k: v for k, v in choice.items() if k != "index"} == {
            k: v for k, v in one["choices"][0].items() if k != "index"
        }
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    texts, finishes = _per_choice(chunks[:-1], 3, "completion")
    assert texts == [one["choices"][0]["text"]] * 3 and finishes == [one["choices"][0]["finish_reason"]] * 3
    assert chunks[-1]["usage"] == three["usage"]


def test_streaming_a_list_of_prompts_numbers_choices_as_the_whole_answer(served):
    client, jobs = served
    model = jobs["alpaca"]["fine_tuned_model"]
    args = {"prompt": ["The sky is", "Red"], "n": 2, "max_tokens": 6, "temperature": 0}
    whole = _complete(client, model, **args).json()
    chunks = _events(_complete(client, model, **args, stream=True, stream_options={"include_usage": True}))
    texts, finishes = _per_choice(chunks[:-1], 4, "completion")
    assert texts == [c["text"] for c in whole["choices"]]  # index p * n + i in both answers
    assert finishes == [c["finish_reason"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    # Prompt after prompt: the first prompt's choices have finished before the second's begin.
    first = [at for at, c in enumerate(chunks[:-1]) if c["choices"][0]["index"] < 2]
    second = [at for at, c in enumerate(chunks[:-1]) if c["choices"][0]["index"] >= 2]
    assert max(first) < min(second)
    # Every prompt is checked before the stream begins: a prompt too long for the context is a 400.
    resp = _complete(client, model, prompt=["The sky is", "red " * 600], stream=True)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text


def test_base_adapter_and_merged_models(served, tiny_model_dir):
    client, jobs = served
    tuned = jobs["alpaca"]["fine_tuned_model"]
    args = {"max_tokens": 12, "temperature": 0}
    base_text = _complete(client, str(tiny_model_dir), **args).json()["choices"][0]["text"]
    tuned_text = _complete(client, tuned, **args).json()["choices"][0]["text"]
    merged_text = _complete(client, f"{tuned}:merged", **args).json()["choices"][0]["text"]
    assert tuned_text != base_text  # the adapter is applied ...
    assert _complete(client, str(tiny_model_dir), **args).json()["choices"][0]["text"] == base_text  # ... and bypassed
    assert merged_text == tuned_text  # the merged model is the base with the adapter folded in


def test_bad_requests_name_the_field(served):
    client, jobs = served
    model = jobs["alpaca"]["fine_tuned_model"]
    cases = [
        (_chat(client, "ft:nope:sqft:ftjob-missing"), 404, "model"),
        (_chat(client, "/etc"), 404, "model"),
        (_chat(client, model, temperature=3), 400, "temperature"),
        (_chat(client, model, tools=[]), 400, "tools"),
        (_chat(client, model, max_tokens=100000), 400, "max_tokens"),
        (_complete(client, model, max_tokens=4000), 400, "max_tokens"),  # beyond the tiny model's 512 context
        (_chat(client, model, stream=True, n=9), 400, "n"),
    ]
    for resp, status, param in cases:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["param"] == param, resp.text


def test_tokenize_counts_what_the_routes_render_and_detokenize_reads_it_back(served, tokenizer):
    """vLLM's /tokenize and /detokenize: a prompt's ids as the chat and completion routes render it (the
    same count as their usage), for the caller's models only, and ids back to text."""
    client, jobs = served
    for name in ("chat", "alpaca"):  # a chat template, and the Alpaca template that job trained with
        model = jobs[name]["fine_tuned_model"]
        resp = client.post("/tokenize", json={"model": model, "messages": ASK})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        used = _chat(client, model, max_tokens=1, temperature=0).json()["usage"]["prompt_tokens"]
        assert body["count"] == len(body["tokens"]) == used and body["max_model_len"] == 512
    model = jobs["alpaca"]["fine_tuned_model"]
    tokens = client.post("/tokenize", json={"model": model, "prompt": "The sky is"}).json()["tokens"]
    assert len(tokens) == _complete(client, model, max_tokens=1).json()["usage"]["prompt_tokens"]
    back = client.post("/detokenize", json={"model": model, "tokens": tokens})
    assert back.status_code == 200 and back.json()["prompt"] == tokenizer.decode(tokens), back.text
    assert back.json()["prompt"].endswith("The sky is")
    cases = [
        (client.post("/tokenize", json={"model": model}), 400, None),  # neither prompt nor messages
        (client.post("/tokenize", json={"model": model, "prompt": "x", "messages": ASK}), 400, None),
        (client.post("/tokenize", json={"model": "ft:nope:sqft:ftjob-missing", "prompt": "x"}), 404, "model"),
        (client.post("/tokenize", json={"model": model, "prompt": "x"}, headers=BOB), 404, "model"),  # Alice's
        (client.post("/detokenize", json={"model": model, "tokens": [len(tokenizer) + 5]}), 400, "tokens"),
        (client.post("/detokenize", json={"model": model, "tokens": [-1]}), 400, "tokens[0]"),
    ]
    for resp, status, param in cases:
        assert resp.status_code == status, resp.text
        if param:
            assert resp.json()["error"]["param"] == param, resp.text


def test_delete_removes_the_artifacts(served, tiny_model_dir):
    client, jobs = served
    name, path = jobs["chat"]["fine_tuned_model"], Path(jobs["chat"]["fine_tuned_model_path"])
    assert _chat(client, name, max_tokens=2).status_code == 200  # loaded in the engine first
    assert client.delete(f"/v1/models/{name}", headers=BOB).status_code == 404
    base = client.delete(f"/v1/models/{tiny_model_dir}", headers=ALICE)
    assert base.status_code == 403 and base.json()["error"]["param"] == "model"
    resp = client.delete(f"/v1/models/{name}", headers=ALICE)
    assert resp.status_code == 200 and resp.json() == {"id": name, "object": "model", "deleted": True}
    assert not path.exists()
    assert client.get(f"/v1/models/{name}", headers=ALICE).status_code == 404
    assert name not in {m["id"] for m in client.get("/v1/models", headers=ALICE).json()["data"]}
    gone = _chat(client, name)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert client.delete(f"/v1/models/{name}", headers=ALICE).status_code == 404


def test_a_full_queue_is_a_429(served):
    client, jobs = served
    engine = client.app.state.inference_service.engine
    held = 0
    while engine.reserve():  # every slot taken, as by requests waiting behind a long generation
        held += 1
    try:
        resp = _chat(client, jobs["alpaca"]["fine_tuned_model"], max_tokens=2)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "engine_overloaded", resp.text
    finally:
        for _ in range(held):
            engine.release()
    assert held == 1 + client.app.state.settings.inference_queue
    assert _chat(client, jobs["alpaca"]["fine_tuned_model"], max_tokens=2).status_code == 200


def test_running_out_of_device_memory_is_a_503_and_the_engine_goes_on(served, tiny_model_dir):
    # A GPU shared with training jobs may have no memory left for a large request. This machine has
    # no such limit, so the loaded model raises what CUDA's allocator raises for more than one row.
    client, _ = served
    model = str(tiny_model_dir)
    assert _complete(client, model, max_tokens=2).status_code == 200  # loaded
    engine = client.app.state.inference_service.engine
    [loaded] = [m for key, m in engine._models.items() if Path(key).resolve() == Path(model).resolve()]
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model

    def tight(_module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    hook = base.register_forward_pre_hook(tight, with_kwargs=True)
    try:
        # Sampled rows (greedy ones are generated once, as one row).
        resp = _complete(client, model, max_tokens=4, n=3, temperature=1.0)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "10", resp.text
        error = resp.json()["error"]
        assert error["code"] == "out_of_memory" and error["type"] == "server_error"
        assert "no memory left for 3 sequence(s)" in error["message"] and "`n`, `max_tokens`" in error["message"]
        # A stream has answered 200 before generating: the error is its last event.
        streamed = _complete(client, model, max_tokens=4, n=2, temperature=1.0, stream=True).text.splitlines()
        last = json.loads([line for line in streamed if line.startswith("data: ")][-1][len("data: ") :])
        assert last["error"]["code"] == "out_of_memory"
        assert _complete(client, model, max_tokens=4, n=1, temperature=1.0).status_code == 200  # smaller fits
    finally:
        hook.remove()
    assert _complete(client, model, max_tokens=4, n=3, temperature=1.0).status_code == 200
