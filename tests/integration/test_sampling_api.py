"""Log-probabilities (``logprobs``, ``top_logprobs``, ``echo``, token-id prompts) and logit adjustments
(``presence_penalty``, ``frequency_penalty``, ``logit_bias``) on /v1/chat/completions and /v1/completions:
the real app, a real fine-tuning job and the engine on a tiny random Llama, every figure and token
checked against plain transformers (+ peft) forwards over the same tokens.

The lm-eval-harness test sends exactly what its ``local-completions`` model sends to score a
continuation and reads the answer as it does (``lm_eval/models/openai_completions.py``).
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sqft_service.app import create_app
from tests.helpers import alpaca_records, write_json
from tests.integration.conftest import make_settings, wait_status

ASK = [{"role": "user", "content": "Repeat the word red."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """The app, with a fine-tuned adapter of the tiny model (a base model is served to a project that
    fine-tuned it): the lm-eval test scores the adapter, the others the base."""
    root = tmp_path_factory.mktemp("logprobs")
    with TestClient(create_app(make_settings(root / "data", inference_threads=1))) as client:
        with open(write_json(root / "a.json", alpaca_records(8)), "rb") as handle:
            uploaded = client.post("/v1/files", files={"file": ("a.json", handle)}, data={"purpose": "fine-tune"})
        body = {
            "model": str(tiny_model_dir),
            "training_file": uploaded.json()["id"],
            "Training": {"batch_size": 4, "epochs": 1, "learning_rate": 5e-2},
            "General": {"lora_config": {"r": 4, "lora_alpha": 16}},
        }
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        yield client, str(tiny_model_dir), done


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Each position's log-softmax for a token sequence, by one forward of the model as saved (with a
    fine-tuned model's adapter on top when ``adapter`` names its directory)."""

    models: dict[str | None, torch.nn.Module] = {}

    def logprobs(ids: list[int], adapter: str | None = None) -> torch.Tensor:
        if (model := models.get(adapter)) is None:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter).eval()
            models[adapter] = model
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


def _post(client, route, body):
    resp = client.post(route, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _events(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    lines = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_lm_eval_harness_scores_a_continuation_as_a_forward_does(served, reference, tokenizer):
    client, _, job = served
    model, adapter = job["fine_tuned_model"], job["fine_tuned_model_path"]
    # lm-eval tokenizes context and continuation itself and sends their ids: a batch of two requests.
    pairs = [("Question: what colour is the sky?\nAnswer:", " blue"), ("The capital of France is", " Paris, of course")]
    prompts, ctxlens = [], []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prompts.append(ctx + cont)
        ctxlens.append(len(ctx))
    payload = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}
    out = _post(client, "/v1/completions", {**payload, "echo": True})

    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert len(choices) == 2 and out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    for choice, ids, ctxlen in zip(choices, prompts, ctxlens, strict=True):
        logprobs = choice["logprobs"]
        # Every prompt token, then the one generated: lm-eval's slice [ctxlen:-1] is the continuation.
        assert len(logprobs["token_logprobs"]) == len(ids) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        # lm-eval's parse_logprobs, as it reads the answer.
        total = sum(logprobs["token_logprobs"][ctxlen:-1])
        is_greedy = all(
            tok == max(top.values())
            for tok, top in zip(logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1], strict=True)
        )
        expected = reference(ids, adapter)
        assert not torch.allclose(expected, reference(ids), atol=1e-3)  # the adapter is what is scored
        want = sum(float(expected[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
        assert total == pytest.approx(want, abs=1e-4)
        assert is_greedy == all(int(expected[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids)))
        # Every prompt token's figure, the first excepted, and the top token per position.
        for i in range(1, len(ids)):
            assert logprobs["token_logprobs"][i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
            ((top_token, top_value),) = logprobs["top_logprobs"][i].items()
            assert top_value == pytest.approx(float(expected[i - 1].max()), abs=1e-4)
            assert top_token == tokenizer.decode([int(expected[i - 1].argmax())])
        # The generated token is the greedy one after the prompt, and its figure the forward's.
        assert logprobs["token_logprobs"][-1] == pytest.approx(float(expected[-1].max()), abs=1e-4)
        # Token texts join into the echoed text, which begins with the prompt.
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert choice["text"].startswith(tokenizer.decode(ids))
        assert logprobs["text_offset"][: len(ids)] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]

    # Scoring alone (max_tokens 0): the same prompt figures, nothing generated.
    scored = _post(client, "/v1/completions", {**payload, "max_tokens": 0, "echo": True, "prompt": prompts[0]})
    (only,) = scored["choices"]
    assert only["logprobs"]["token_logprobs"] == choices[0]["logprobs"]["token_logprobs"][:-1]
    assert only["text"] == tokenizer.decode(prompts[0]) and scored["usage"]["completion_tokens"] == 0
    assert only["finish_reason"] == "length"


def test_generated_tokens_carry_their_log_probabilities(served, reference, tokenizer):
    client, model, _ = served
    # A random model's answer need not tokenize back to the tokens it generated: each answer token is
    # found among the vocabulary entries with its text, as the one the reference forward scores alike.
    by_text: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        by_text.setdefault(tokenizer.decode([token_id]), []).append(token_id)
    prompt = tokenizer("The sky is")["input_ids"]
    body = {"model": model, "prompt": "The sky is", "max_tokens": 8, "logprobs": 3}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5, "n": 2}):
        out = _post(client, "/v1/completions", {**body, **sampling})
        assert sum(len(c["logprobs"]["tokens"]) for c in out["choices"]) == out["usage"]["completion_tokens"]
        for choice in out["choices"]:
            logprobs = choice["logprobs"]
            tokens = logprobs["tokens"]
            assert "".join(tokens) == choice["text"]
            assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
            ids: list[int] = []
            for text, value, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
                # The model's own distribution, whatever the temperature.
                expected = reference(prompt + ids)[-1]
                matches = [i for i in by_text[text] if abs(float(expected[i]) - value) < 1e-4]
                assert matches, (text, value)
                ids.append(matches[0])
                assert len(top) == 3 and max(top.values()) == pytest.approx(float(expected.max()), abs=1e-4)
                if sampling["temperature"] == 0:
                    assert value == max(top.values())  # greedy picks the likeliest


def test_sampled_choices_draw_each_token_from_the_top_p_nucleus_of_the_full_forward(served, reference, tokenizer):
    """``n`` choices share one run of their prompt (its KV cache repeated per row) and draw by the inverse
    CDF at the request's temperature and top-p: each token picked must lie in the nucleus that one full
    forward of the prompt and the tokens before it gives (a draw from the whole vocabulary, or a cache
    that went wrong, falls outside it almost always: the nucleus is a few percent of the tokens)."""
    client, model, _ = served
    by_text: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        by_text.setdefault(tokenizer.decode([token_id]), []).append(token_id)
    prompt = tokenizer("The sky is")["input_ids"]
    temperature, top_p = 1.5, 0.05
    body = {"model": model, "prompt": prompt, "max_tokens": 3, "logprobs": 0, "n": 8, "seed": 9}
    out = _post(client, "/v1/completions", {**body, "temperature": temperature, "top_p": top_p})
    drawn = set()
    for choice in out["choices"]:
        ids: list[int] = []
        for text, value in zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], strict=True):
            logprobs = reference(prompt + ids)[-1]
            (token, *_) = [i for i in by_text[text] if abs(float(logprobs[i]) - value) < 1e-4]
            probs = (logprobs / temperature).softmax(-1)
            ordered, order = probs.sort(descending=True)
            nucleus = set(order[(ordered.cumsum(-1) - ordered) < top_p].tolist())
            assert len(nucleus) < 0.1 * len(probs) and token in nucleus, (text, len(nucleus))
            ids.append(token)
        drawn.add(tuple(ids))
    assert len(drawn) > 1  # the rows drew apart


def test_chat_logprobs_streamed_equal_whole(served, tokenizer):
    client, model, _ = served
    body = {"model": model, "messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = _post(client, "/v1/chat/completions", body)
    (choice,) = whole["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] and choice["logprobs"]["refusal"] is None
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for entry in content:
        assert (
            len(entry["top_logprobs"]) == 2
            and entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        )
        assert (
            entry["top_logprobs"][0]["token"] == entry["token"]
            and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        )
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]

    streamed = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    pieces = [c["choices"][0] for c in streamed if c["choices"]]
    assert [e for p in pieces if p["logprobs"] for e in p["logprobs"]["content"]] == content
    assert "".join(p["delta"].get("content") or "" for p in pieces) == choice["message"]["content"]

    # Without logprobs nothing is scored; a streamed completion with echo sends the prompt first.
    plain = _post(client, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
    completion = {"model": model, "prompt": "Red is", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    one = _post(client, "/v1/completions", completion)["choices"][0]
    chunks = [c["choices"][0] for c in _events(client.post("/v1/completions", json={**completion, "stream": True}))]
    assert chunks[0]["text"] == tokenizer.decode(tokenizer("Red is")["input_ids"])
    assert "".join(c["text"] for c in chunks) == one["text"]
    joined = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in one["logprobs"]}
    assert joined == one["logprobs"]


def test_token_prompts_and_bad_logprob_requests(served, tokenizer):
    client, model, _ = served
    ids = tokenizer("The sky is")["input_ids"]
    by_ids = _post(client, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 5, "temperature": 0})
    by_text = _post(
        client, "/v1/completions", {"model": model, "prompt": "The sky is", "max_tokens": 5, "temperature": 0}
    )
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)

    chat = {"model": model, "messages": ASK}
    complete = {"model": model, "prompt": "x"}
    cases = [
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {**complete, "logprobs": 6}, "logprobs"),
        ("/v1/completions", {**complete, "prompt": [len(tokenizer) + 5]}, "prompt"),
        ("/v1/completions", {**complete, "prompt": []}, "prompt"),
        ("/v1/completions", {**complete, "prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {**complete, "prompt": [-1]}, "prompt"),
        ("/v1/chat/completions", {**chat, "max_tokens": 0}, "max_tokens"),  # only a completion scores a prompt
    ]
    for route, body, param in cases:
        resp = client.post(route, json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["param"].startswith(param), (body, resp.text)


def test_penalties_and_biases_pick_the_tokens_openai_defines(served, reference, tokenizer):
    client, model, _ = served
    prompt = tokenizer("The sky is")["input_ids"]
    eos = {tokenizer.eos_token_id}
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}

    def greedy(presence: float, frequency: float) -> str:
        """Greedy decoding by OpenAI's definition: logit - frequency * count - presence * [count > 0],
        counted over the generated tokens (a log-softmax differs from the logits by a constant)."""
        out: list[int] = []
        for _ in range(12):
            scores = reference(prompt + out)[-1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=scores.shape[0]).float()
            token = int((scores - frequency * counts - presence * (counts > 0).float()).argmax())
            if token in eos:
                break
            out.append(token)
        return tokenizer.decode(out)

    plain = _post(client, "/v1/completions", body)["choices"][0]["text"]
    assert plain == greedy(0.0, 0.0)
    # A random model hardly repeats a token, so positive penalties seldom change its answer; negative
    # ones (a bonus for repeating) do.
    for presence, frequency in ((1.0, 2.0), (-0.5, -1.5)):
        penalties = {"presence_penalty": presence, "frequency_penalty": frequency}
        assert _post(client, "/v1/completions", {**body, **penalties})["choices"][0]["text"] == greedy(
            presence, frequency
        )
    assert greedy(-0.5, -1.5) != plain
    # Zeros (what some clients always send) are no adjustment.
    zeros = {**body, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    assert _post(client, "/v1/completions", zeros)["choices"][0]["text"] == plain

    # A +100 bias makes a token the only choice, greedy or sampled; -100 rules the greedy one out.
    favourite = tokenizer(" red", add_special_tokens=False)["input_ids"][0]
    for sampling in ({"temperature": 0}, {"temperature": 1.2, "top_p": 0.5, "seed": 3, "n": 2}):
        out = _post(
            client, "/v1/completions", {**body, **sampling, "max_tokens": 5, "logit_bias": {str(favourite): 100}}
        )
        assert [c["text"] for c in out["choices"]] == [" red" * 5] * len(out["choices"])
    first = tokenizer(plain, add_special_tokens=False)["input_ids"][0]
    banned = _post(client, "/v1/completions", {**body, "max_tokens": 1, "logit_bias": {str(first): -100}})
    assert banned["choices"][0]["text"] != tokenizer.decode([first])

    chat = {"model": model, "messages": ASK}
    cases = [
        ({**chat, "logit_bias": {"red": 1}}, "logit_bias"),
        ({**chat, "logit_bias": {"5": 101}}, "logit_bias"),
        ({**chat, "logit_bias": {str(10**6): 1}}, "logit_bias"),  # outside the vocabulary
        ({**chat, "logit_bias": {str(10**6): 1}, "stream": True}, "logit_bias"),  # checked before the stream
        ({**chat, "presence_penalty": 2.5}, "presence_penalty"),
        ({**chat, "frequency_penalty": -3}, "frequency_penalty"),
    ]
    for body, param in cases:
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["param"].startswith(param), (body, resp.text)


SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "bright": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["colour", "bright", "name"],
    "additionalProperties": False,  # else JSON Schema allows more keys, and a random model writes them
}


def _fits(text: str) -> dict:
    """The answer parsed, checked against SCHEMA by hand."""
    answer = json.loads(text)
    assert set(answer) == {"colour", "bright", "name"}, answer
    assert answer["colour"] in ("red", "green", "blue") and isinstance(answer["bright"], bool)
    assert isinstance(answer["name"], str) and len(answer["name"]) <= 6
    return answer


def test_structured_outputs_hold_the_answer_to_the_schema(served, tokenizer):
    client, model, job = served
    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True}}
    body = {"model": model, "messages": ASK, "max_tokens": 128, "response_format": fmt}
    # A random model never writes JSON by itself; held to the schema, greedy or sampled, it does.
    free = _post(client, "/v1/chat/completions", {**body, "response_format": None, "temperature": 0})
    with pytest.raises(ValueError):
        json.loads(free["choices"][0]["message"]["content"])
    greedy = _post(client, "/v1/chat/completions", {**body, "temperature": 0})
    assert greedy["choices"][0]["finish_reason"] == "stop", greedy["choices"][0]["message"]["content"]
    _fits(greedy["choices"][0]["message"]["content"])
    sampled = _post(client, "/v1/chat/completions", {**body, "temperature": 1.0, "seed": 11, "n": 3})
    assert all(c["finish_reason"] == "stop" and _fits(c["message"]["content"]) for c in sampled["choices"])
    # The fine-tuned model (an adapter) too, and streamed as a whole answer is.
    tuned = {**body, "model": job["fine_tuned_model"], "temperature": 0}
    whole = _post(client, "/v1/chat/completions", tuned)["choices"][0]["message"]["content"]
    _fits(whole)
    chunks = _events(client.post("/v1/chat/completions", json={**tuned, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole

    # json_object: any object; with "}" favoured the model closes the first one it may.
    (close,) = tokenizer("}", add_special_tokens=False)["input_ids"]
    braces = {**body, "response_format": {"type": "json_object"}, "temperature": 0, "logit_bias": {str(close): 100}}
    answer = _post(client, "/v1/chat/completions", braces)["choices"][0]["message"]["content"]
    assert json.loads(answer) == {}

    cases = [
        {"type": "json_schema"},  # no schema
        {"type": "text", "json_schema": {"name": "x", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}},
        {"type": "xml"},
    ]
    for fmt in cases:
        resp = client.post("/v1/chat/completions", json={**body, "response_format": fmt})
        assert resp.status_code == 400, (fmt, resp.text)
        assert resp.json()["error"]["param"].startswith("response_format"), (fmt, resp.text)
