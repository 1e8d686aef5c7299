"""A 400's ``param`` names the field as the request wrote it (``api/body.py``): pydantic's union branch labels
and tagged unions' tags are left out, walking the body beside the location tells a tag from a field of the
same name, and a field named like its object's type stays."""

from __future__ import annotations

import pytest

from sqft_service.api.body import validate_body
from sqft_service.api.evals.protocol import CreateRunRequest
from sqft_service.api.inference.protocol import ChatCompletionRequest
from sqft_service.errors import InvalidRequestError

IMAGE = "data:image/png;base64,iVBORw0KGgo="


def _param(model, body) -> str:
    with pytest.raises(InvalidRequestError) as refused:
        validate_body(model, body)
    return refused.value.param


def _run(template: list) -> dict:
    source = {"type": "file_content", "content": [{"item": {}}]}
    data_source = {"type": "completions", "model": "m", "source": source}
    return {"data_source": {**data_source, "input_messages": {"type": "template", "template": template}}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # The data source's tag ("completions") and input_messages' ("template", a field's name too).
        (
            _run([{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]),
            "data_source.input_messages.template[0].content[0]",
        ),
        (
            _run([{"role": "user", "content": [{"type": "input_image", "image_url": "x", "detail": "max"}]}]),
            "data_source.input_messages.template[0].content[0].detail",
        ),
        (_run([{"role": "robot", "content": "x"}]), "data_source.input_messages.template[0].role"),
        ({"data_source": {"type": "completions", "source": {"type": "file_id"}}}, "data_source.source.id"),
    ],
)
def test_an_eval_run_error_names_the_field(body, param):
    assert _param(CreateRunRequest, body) == param


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE, "detail": "max"}}]}
                ]
            },
            "messages[0].content[0].image_url.detail",
        ),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),  # missing: a field, though named like the type
    ],
)
def test_a_chat_error_names_the_field(change, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    assert _param(ChatCompletionRequest, body) == param
