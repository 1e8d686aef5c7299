"""The official ``openai`` SDK against a real ``sqft serve`` process: fine-tune a tiny model, then chat with it."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import sdk_job_end


class GetWeather(BaseModel):
    city: str = Field(max_length=12)
    unit: Literal["c", "f"]


def test_openai_sdk_lists_and_chats_with_a_fine_tuned_model(sdk, tmp_path, tiny_model_dir):
    client = sdk
    with open(write_json(tmp_path / "train.json", alpaca_records(8)), "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=uploaded.id,
        suffix="sdk",
        extra_body={"Training": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2}},
    )
    done = sdk_job_end(client, job.id)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name == f"ft:{tiny_model_dir.name}:sdk:{job.id}"
    assert name in [m.id for m in client.models.list()]
    assert client.models.retrieve(name).id == name

    messages = [{"role": "user", "content": "Repeat the word red."}]
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.model == name
    assert answer.choices[0].message.role == "assistant"
    assert 1 <= answer.usage.completion_tokens <= 6

    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason

    # n sampled choices streamed: the SDK reads each chunk's choice index; per index, the pieces
    # join into the choice a non-streamed request with the same seed returns.
    sampled = {"model": name, "messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    whole = client.chat.completions.create(**sampled)
    texts, finishes = [""] * 3, [None] * 3
    for chunk in client.chat.completions.create(**sampled, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    completions = client.completions.create(model=name, prompt="The sky", max_tokens=6, n=2, seed=1, stream=True)
    streamed = [""] * 2
    for chunk in completions:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    plain = client.completions.create(model=name, prompt="The sky", max_tokens=6, n=2, seed=1)
    assert streamed == [c.text for c in plain.choices]

    # A list of prompts streamed, as OpenAI's: prompt p's choice i has index p * n + i, as in the
    # non-streamed answer; each index finishes once; the usage chunk counts every prompt and choice.
    listed = {"model": name, "prompt": ["The sky", "Red is"], "max_tokens": 8, "n": 2, "seed": 3}
    whole = client.completions.create(**listed, temperature=1.0)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    texts, finishes, usage = [""] * 4, [[] for _ in range(4)], None
    chunks = client.completions.create(**listed, temperature=1.0, stream=True, stream_options={"include_usage": True})
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    assert texts == [c.text for c in whole.choices] and len(set(texts)) > 1, texts
    assert finishes == [[c.finish_reason] for c in whole.choices]
    assert usage == whole.usage
    greedy = client.completions.create(**listed, temperature=0)
    streamed = [""] * 4
    for chunk in client.completions.create(**listed, temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in greedy.choices]

    # Log-probabilities in the SDK's own types: a chat answer's tokens, and a prompt of token ids
    # scored (echo, max_tokens 0), as lm-eval-harness's local-completions model asks.
    scored = client.chat.completions.create(
        model=name, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert "".join(t.token for t in content) == scored.choices[0].message.content
    assert all(t.logprob <= 0 and t.top_logprobs[0].token == t.token for t in content)
    prompt = client.completions.create(model=name, prompt=[[504, 3575, 282, 4649]], max_tokens=0, echo=True, logprobs=1)
    logprobs = prompt.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and logprobs.token_logprobs[0] is None
    assert all(lp < 0 for lp in logprobs.token_logprobs[1:]) and prompt.usage.completion_tokens == 0

    # The Responses API in the SDK's types: the answer chat gives the same turn, streamed alike, stored.
    response = client.responses.create(model=name, input="Repeat the word red.", max_output_tokens=6, temperature=0)
    assert response.output_text == answer.choices[0].message.content
    assert response.usage.output_tokens == answer.usage.completion_tokens
    assert client.responses.retrieve(response.id).output_text == response.output_text
    counted = client.responses.input_tokens.count(model=name, input="Repeat the word red.")
    assert counted.input_tokens == response.usage.input_tokens
    scored = client.responses.create(
        model=name,
        input="Repeat the word red.",
        max_output_tokens=6,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=1,
    )
    tokens = scored.output[0].content[0].logprobs  # greedy: each the likeliest
    assert "".join(t.token for t in tokens) == scored.output_text == response.output_text
    assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in tokens)
    (item,) = client.responses.input_items.list(response.id).data
    assert item.content[0].text == "Repeat the word red."
    streamed_events = list(
        client.responses.create(
            model=name, input="Repeat the word red.", max_output_tokens=6, temperature=0, stream=True
        )
    )
    deltas = "".join(e.delta for e in streamed_events if e.type == "response.output_text.delta")
    assert deltas == response.output_text and streamed_events[-1].response.output_text == response.output_text
    # An Alpaca-trained model has no turns: continuing a conversation is a 400 naming `input`.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=name, input="Again.", previous_response_id=response.id)
    assert refused.value.body["param"] == "input"
    # A conversation in the SDK's types: a response made in it adds its input and answer; an
    # Alpaca-trained model cannot continue it either.
    conversation = client.conversations.create(metadata={"user": "sdk"})
    made = client.responses.create(
        model=name, input="Repeat the word red.", max_output_tokens=6, temperature=0, conversation=conversation.id
    )
    assert made.output_text == response.output_text and made.conversation.id == conversation.id
    kept = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.role for item in kept] == ["user", "assistant"] and kept[1].content[0].text == made.output_text
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=name, input="Again.", conversation=conversation.id)
    assert refused.value.body["param"] == "input"
    assert client.conversations.delete(conversation.id).deleted
    # In the background: answered at once, polled with retrieve, the same answer; cancel answers it as it ended.
    queued = client.responses.create(
        model=name, input="Repeat the word red.", max_output_tokens=6, temperature=0, background=True
    )
    assert queued.status == "queued" and queued.background
    polled = wait_until(
        lambda: (r := client.responses.retrieve(queued.id)).status not in ("queued", "in_progress") and r,
        60,
        what="the background response",
    )
    assert polled.output_text == response.output_text
    assert client.responses.cancel(queued.id).status == polled.status
    # Streamed in the background: a reader that leaves does not stop it, and the SDK's stream helper
    # resumes from the last sequence number it saw (its snapshot rebuilt from the replay), joining the same answer.
    ask = {"model": name, "input": "Repeat the word red.", "max_output_tokens": 6, "temperature": 0}
    with client.responses.stream(**ask, background=True) as first:
        seen = []
        for event in first:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break
    assert [e.type for e in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
    with client.responses.stream(response_id=seen[0].response.id, starting_after=seen[-1].sequence_number) as rest:
        resumed = list(rest)
    final = resumed[-1].response  # `incomplete` (cut at 6 tokens), as the foreground answer
    assert resumed[0].sequence_number == seen[-1].sequence_number + 1
    assert seen[-1].delta + "".join(e.delta for e in resumed if e.type == "response.output_text.delta") == (
        response.output_text
    )
    assert final.output_text == response.output_text and final.status == polled.status
    raw = client.responses.retrieve(final.id, stream=True, starting_after=seen[-1].sequence_number)
    assert [e.sequence_number for e in raw] == [e.sequence_number for e in resumed]
    assert client.responses.delete(response.id) is None

    # Function calling in the SDK's types, on the base model (the project fine-tuned it): a call the
    # request requires is made whatever the weights, and the SDK's `parse` reads its arguments into
    # the pydantic model its tool came from; its stream helper joins the streamed call alike.
    base, weather = str(tiny_model_dir), openai.pydantic_function_tool(GetWeather)
    ask = {"model": base, "messages": messages, "tools": [weather], "max_tokens": 64, "temperature": 0}
    chosen = {"type": "function", "function": {"name": "GetWeather"}}
    parsed = client.chat.completions.parse(**ask, tool_choice=chosen)
    (call,) = parsed.choices[0].message.tool_calls
    assert parsed.choices[0].finish_reason == "tool_calls" and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    with client.chat.completions.stream(**ask, tool_choice=chosen) as events:
        streamed_call = events.get_final_completion().choices[0].message.tool_calls[0]
    assert streamed_call.function.parsed_arguments == call.function.parsed_arguments
    flat = {"type": "function", **weather["function"]}
    made = client.responses.create(
        model=base, input="Weather?", tools=[flat], tool_choice="required", max_output_tokens=64, temperature=0
    )
    assert made.output[0].type == "function_call" and made.output[0].name == "GetWeather"
    GetWeather.model_validate_json(made.output[0].arguments)

    assert client.models.delete(name).deleted is True
    assert name not in [m.id for m in client.models.list()]
