"""Images through the API (``inference/images.py``): the official ``openai`` SDK against a real ``sqft serve``
sends ``image_url`` parts to chat completions and ``input_image`` parts to responses of a tiny image-text
model, and gets transformers' own answer; stored completions and responses keep the images as sent; a
text-only model, a URL or an unreadable image is a 400 naming the part."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from sqft_service.app import create_app
from sqft_service.inference.images import read_image
from tests.helpers import CHAT, wait_until, write_jsonl
from tests.image_text import (
    COLOUR_QUESTION,
    COLOURS,
    colour_records,
    colour_url,
    image_data_url,
    image_record,
    save_image_text_model,
)
from tests.integration.conftest import make_settings, sdk_job_end
from tests.unit.test_image_input import _transformers

QUESTION = "What is in this picture?"


def _content(url: str) -> list[dict]:
    return [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]


def _peft_answer(base: str, adapter: Path, url: str) -> str:
    """The greedy answer of ``base`` with the stock-peft ``adapter`` attached, by transformers alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base)
    model = Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    turns = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=text, images=[read_image(url).convert("RGB")], add_special_tokens=False, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_sdk_chats_and_responds_about_an_image_to_a_model_fine_tuned_on_text(sdk, tmp_path, tokenizer_dir):
    """Gemma 3 4B's case: an image-text base fine-tuned on chat text, then asked about an image."""
    vlm = str(save_image_text_model(tmp_path / "tiny-vlm", tokenizer_dir))
    with open(write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 8), "rb") as handle:
        uploaded = sdk.files.create(file=handle, purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=vlm,
        training_file=uploaded.id,
        extra_body={"Training": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-2}},
    )
    done = sdk_job_end(sdk, job.id)
    assert done.status == "succeeded", done.error
    url = image_data_url(7, size=(1200, 900))  # ~4 MB as base64: over the plain JSON limit, under the image one
    messages = [{"role": "user", "content": _content(url)}]

    n_prompt, expected = _transformers(vlm, url, 8)
    base = sdk.chat.completions.create(model=vlm, messages=messages, max_tokens=8, temperature=0)
    assert base.choices[0].message.content == expected
    assert base.usage.prompt_tokens == n_prompt  # the image's tokens counted

    tuned = done.fine_tuned_model
    (adapter,) = {p.parent for p in (tmp_path / "data").rglob("adapter_config.json") if "checkpoint" not in str(p)}
    expected = _peft_answer(vlm, adapter, url)
    answer = sdk.chat.completions.create(model=tuned, messages=messages, max_tokens=8, temperature=0, store=True)
    assert answer.choices[0].message.content == expected != base.choices[0].message.content
    stream = sdk.chat.completions.create(model=tuned, messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    kept = sdk.chat.completions.messages.list(answer.id).data
    assert kept[0].content == QUESTION and kept[0].content_parts[1].image_url.url == url

    parts = [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": url, "detail": "auto"}]
    response = sdk.responses.create(
        model=tuned, input=[{"role": "user", "content": parts}], max_output_tokens=8, temperature=0
    )
    assert response.output_text == expected
    listed = sdk.responses.input_items.list(response.id).data
    assert listed[0].content[1].type == "input_image" and listed[0].content[1].image_url == url
    # The stored turns (image included) are the next response's context.
    follow = sdk.responses.create(
        model=tuned, previous_response_id=response.id, input="And the colours?", max_output_tokens=4, temperature=0
    )
    assert follow.error is None and follow.usage.input_tokens > n_prompt + 8  # the image, the answer, the question


def test_a_text_only_model_refuses_images(sdk, tmp_path, tiny_model_dir):
    with open(write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 4), "rb") as handle:
        uploaded = sdk.files.create(file=handle, purpose="fine-tune")
    sdk.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id)  # lists the base
    messages = [{"role": "user", "content": _content(image_data_url(1, size=(8, 8)))}]
    with pytest.raises(openai.BadRequestError, match="reads text only") as refused:
        sdk.chat.completions.create(model=str(tiny_model_dir), messages=messages, max_tokens=4)
    assert refused.value.body["param"] == "messages"


@pytest.mark.parametrize(
    ("content", "param", "words"),
    [
        (_content("http://169.254.169.254/latest"), "messages[0].content[1].image_url", "fetches nothing"),
        (_content("data:image/png;base64,AAAA"), "messages[0].content[1].image_url", "not an image"),
        (
            [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}],
            "messages[0].content[0].image_url.detail",
            "",
        ),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "messages[0].content[0]", ""),
    ],
)
def test_an_image_the_service_cannot_take_is_a_400_naming_its_part(client, content, param, words):
    resp = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error


def test_images_come_from_users_and_at_most_sixteen_a_request(client):
    url = image_data_url(1, size=(4, 4))
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    resp = client.post("/v1/chat/completions", json={"model": "m", "messages": [system]})
    assert resp.status_code == 400 and "`user` messages" in resp.json()["error"]["message"]
    many = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 17}
    resp = client.post("/v1/chat/completions", json={"model": "m", "messages": [many]})
    assert resp.status_code == 400 and "at most 16" in resp.json()["error"]["message"]
    image = {"type": "input_image", "file_id": "file-abc"}
    resp = client.post("/v1/responses", json={"model": "m", "input": [{"role": "user", "content": [image]}]})
    assert resp.status_code == 400 and "`data:` URL" in resp.json()["error"]["message"]


def test_the_image_routes_take_bodies_up_to_their_own_limit(tmp_path):
    settings = make_settings(tmp_path / "data", max_json_bytes=1000, max_media_json_bytes=5000)
    padding = "x" * 2000
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/fine_tuning/jobs", json={"model": padding}).status_code == 413
        chat = client.post(
            "/v1/chat/completions", json={"model": padding, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 404  # read whole, then the unknown model
        huge = client.post("/v1/chat/completions", json={"model": padding * 3, "messages": []})
        assert huge.status_code == 413


def test_the_sdk_fine_tunes_on_images_and_the_model_answers_from_the_picture(sdk, client, tmp_path, tokenizer_dir):
    """OpenAI's vision fine-tuning: every record asks the same question of a red or a blue picture; the
    fine-tuned model, served, names the colour of pictures it never saw."""
    vlm = str(save_image_text_model(tmp_path / "tiny-vlm", tokenizer_dir))
    with open(write_jsonl(tmp_path / "colours.jsonl", colour_records(16)), "rb") as handle:
        uploaded = sdk.files.create(file=handle, purpose="fine-tune")
    assert (uploaded.format, uploaded.n_records, uploaded.n_images) == ("chat", 16, 16)
    body = {
        "General": {"lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "Training": {"epochs": 8, "batch_size": 4, "learning_rate": 5e-2, "mixed_precision": "no"},
    }
    with pytest.raises(openai.BadRequestError, match="padded batches") as refused:
        sdk.fine_tuning.jobs.create(
            model=vlm, training_file=uploaded.id, extra_body={**body, "Dataset": {"packing": True}}
        )
    assert refused.value.body["param"] == "Dataset.packing"
    job = sdk.fine_tuning.jobs.create(model=vlm, training_file=uploaded.id, extra_body=body)
    done = sdk_job_end(sdk, job.id)
    assert done.status == "succeeded", done.error
    events = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
    assert any("images: 16 in the data" in m for m in events), events
    assert any(m.endswith("(16 records, 16 images)") for m in events), events
    # The length limits left unset grew to fit an image (4 tokens in this tiny model) beside the default text room.
    assert any(
        m.startswith(
            "`Dataset.max_source_length` 396 and `Dataset.max_length` 524: "
            "the records hold up to 1 image(s) of 4 tokens"
        )
        for m in events
    ), events
    for seed, name in enumerate(COLOURS, start=200):
        content = [
            {"type": "text", "text": COLOUR_QUESTION},
            {"type": "image_url", "image_url": {"url": colour_url(COLOURS[name], seed)}},
        ]
        answer = sdk.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0
        )
        assert answer.choices[0].message.content == name

    # The Evals API compares what was trained: a template with an `input_image` part read from each row,
    # graded by exact match and by a judge that is itself shown the picture (the base model).
    rows = [{"item": {"image_url": colour_url(COLOURS[n], 300 + i), "answer": n}} for i, n in enumerate(COLOURS)]
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": vlm,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Is this picture {{ sample.output_text }}?"},
                    {"type": "input_image", "image_url": "{{ item.image_url }}"},
                ],
            },
        ],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    exact = {
        "type": "string_check",
        "name": "exact",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "eq",
    }
    schema = {"type": "object", "properties": {"image_url": {"type": "string"}, "answer": {"type": "string"}}}
    ev = sdk.evals.create(
        name="colours",
        data_source_config={"type": "custom", "item_schema": schema, "include_sample_schema": True},
        testing_criteria=[exact, judge],
    )
    template = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": COLOUR_QUESTION},
                {"type": "input_image", "image_url": "{{ item.image_url }}"},
            ],
        }
    ]
    run = sdk.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": done.fine_tuned_model,
            "input_messages": {"type": "template", "template": template},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 1},
            "source": {"type": "file_content", "content": rows},
        },
    )
    ended = wait_until(
        lambda: (r := sdk.evals.runs.retrieve(run.id, eval_id=ev.id)).status in ("completed", "failed") and r,
        120,
        what="the eval run",
    )
    assert ended.status == "completed", ended.error
    assert ended.result_counts.errored == 0
    items = list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id))
    for item in items:
        assert item.sample.input[0].content == COLOUR_QUESTION + "[image]"
        assert item.sample.output[0].content == item.datasource_item["answer"]
        verdict = next(r for r in item.results if r.name == "judge")
        assert verdict.sample["model"] == vlm and verdict.result in ("yes", "no")
    by_name = {r.testing_criteria: r for r in ended.per_testing_criteria_results}
    assert by_name["exact"].passed == 2 and by_name["exact"].failed == 0
    # A template part that is not one of OpenAI's is a 400 naming it.
    bad = [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.evals.runs.create(
            ev.id,
            data_source={
                "type": "completions",
                "model": done.fine_tuned_model,
                "input_messages": {"type": "template", "template": bad},
                "source": {"type": "file_content", "content": rows},
            },
        )
    assert refused.value.body["param"].startswith("data_source.input_messages.template[0].content")

    # An upload whose image the service cannot take is a 400 naming the line; nothing is kept.
    records = [*colour_records(1), image_record(["https://example.com/red.png"], "red")]
    data = "\n".join(json.dumps(r) for r in records).encode()
    resp = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("bad.jsonl", data)})
    assert resp.status_code == 400, resp.text
    assert "line 2" in resp.json()["error"]["message"] and "fetches nothing" in resp.json()["error"]["message"]
