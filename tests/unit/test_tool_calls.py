"""Function calling (``tool_calls.py``): rendering tools, calls and results in training and serving alike,
reading calls back from answers (whole and streamed), and the grammar of a required call, held by
llguidance over the SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from llguidance import LLMatcher
from llguidance.hf import from_tokenizer

from sqft_service.api.inference.protocol import ChatCompletionRequest
from sqft_service.inference.render import chat_ids
from sqft_service.tool_calls import (
    CallParser,
    HeldStream,
    call_grammar,
    call_text,
    finish_reason,
    template_messages,
)
from sqft_service.training.prompts import chat_segments
from sqft_service.training.records import DataValidationError, _validate_record

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C in Paris."},
]
# A template that renders `tools` itself, as Qwen 2.5's does (trimmed): tools in the system turn, calls
# as <tool_call> lines, results as a tool turn.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_parser_reads_tagged_calls_bare_json_and_leaves_anything_else_as_text():
    parser = CallParser(frozenset({"get_weather", "get_time"}))
    text = "Let me check.\n" + call_text("get_weather", {"city": "Oslo"}) + "\n" + call_text("get_time", "{}")
    content, calls = parser.split(text)
    assert content == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}, {"name": "get_time", "arguments": "{}"}]
    assert CallParser(parser.names, parallel=False).split(text)[1] == calls[:1]
    # Llama 3.x's bare JSON, with `parameters`; arguments given as a JSON string are read too.
    assert parser.split('{"name": "get_time", "parameters": {"tz": "UTC"}}') == (
        None,
        [{"name": "get_time", "arguments": '{"tz": "UTC"}'}],
    )
    assert parser.split('<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>')[1][0]["arguments"] == "{}"
    # max_tokens cut the second call: the first is given, the cut one dropped, and the answer says "length".
    assert parser.split(call_text("get_time", {}) + '\n<tool_call>\n{"name": "get_ti') == (
        None,
        [{"name": "get_time", "arguments": "{}"}],
    )
    assert [finish_reason([{}], "length"), finish_reason([{}], "stop"), finish_reason([], "stop")] == [
        "length",
        "tool_calls",
        "stop",
    ]
    for text in (
        call_text("delete_all", {}),  # not one of the tools
        '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "get_time", "argu',  # cut short by max_tokens
        '{"city": "Paris"}',  # JSON, but not a call
        "It is sunny.",
    ):
        assert parser.split(text) == (text, []), text


@pytest.mark.parametrize(
    "text",
    [
        "Sure.\n" + call_text("get_weather", {"city": "Rome"}),
        call_text("get_weather", {"city": "Rome"}) + "\n" + call_text("get_time", {}),
        '  {"name": "get_time", "arguments": {}}',
        "a < b <tool_ca but no call <tool",
        "plain text",
        "",
    ],
)
def test_a_streamed_answer_sends_text_until_a_call_and_then_the_calls_whole(text):
    parser = CallParser(frozenset({"get_weather", "get_time"}))
    for size in (1, 3, 7):
        held = HeldStream(parser)
        sent = "".join(held.push(text[i : i + size]) for i in range(0, len(text), size))
        rest, calls = held.finish()
        content, expected = parser.split(text)
        assert calls == expected
        if calls:
            assert OPEN_TAG not in sent and "{" not in sent
            assert (sent + rest).strip() == (content or "")
        else:
            assert sent + rest == text


OPEN_TAG = "<tool_call>"


def test_training_and_serving_render_a_conversation_with_tools_alike(tokenizer):
    """SmolLM2's template knows no tools: they go to the system prompt, calls and results as tagged text;
    the call is a training target like any answer, and serving renders the same prompt."""
    segments = chat_segments(CONVERSATION, tokenizer, 0, [WEATHER])
    prompt, call = segments[0], segments[1]
    assert not prompt[1] and '"name": "get_weather"' in prompt[0] and "<tools>" in prompt[0]
    assert call == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        True,
    )
    assert [t for t, target in segments if target][1] == "It is 18 C in Paris.<|im_end|>"
    assert "<tool_response>\n18 C\n</tool_response>" in segments[2][0] and not segments[2][1]
    served = chat_ids(tokenizer, CONVERSATION[:3], "chat", [WEATHER])
    trained = tokenizer("".join(t for t, _ in segments[:3]), add_special_tokens=False)["input_ids"]
    assert served == trained
    # A system prompt keeps its text; the tools follow it.
    turns, _ = template_messages([{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]], [WEATHER], False)
    assert turns[0]["content"].startswith("Be brief.\n\n# Tools") and len(turns) == 2


def test_a_template_that_reads_tools_renders_them_itself(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = NATIVE_TEMPLATE
    segments = chat_segments(CONVERSATION, tokenizer, 0, [WEATHER])
    assert segments[0] == (
        "<|im_start|>system\nTOOLS:get_weather;<|im_end|>\n<|im_start|>user\nWeather in Paris?"
        "<|im_end|>\n<|im_start|>assistant\n",
        False,
    )
    assert segments[1] == ('<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>', True)
    assert "<|im_start|>tool\n18 C<|im_end|>" in segments[2][0]
    served = tokenizer.decode(chat_ids(tokenizer, CONVERSATION[:3], "chat", [WEATHER]))
    assert served == "".join(t for t, _ in segments[:3])


def _matcher(tokenizer, grammar):
    return LLMatcher(from_tokenizer(tokenizer, eos_token=tokenizer.eos_token_id), grammar, log_level=0)


def _accepts(tokenizer, grammar, text) -> bool:
    matcher = _matcher(tokenizer, grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_a_required_call_is_held_to_its_functions_and_their_schemas(tokenizer):
    anything = call_grammar([WEATHER, TIME], None, parallel=True)
    one = call_text("get_weather", {"city": "Paris"})
    assert _accepts(tokenizer, anything, one)
    assert _accepts(tokenizer, anything, one + "\n" + call_text("get_time", {}))
    assert not _accepts(tokenizer, anything, call_text("get_weather", {"unit": "c"}))  # city is required
    assert not _accepts(tokenizer, anything, call_text("get_weather", {"city": "Paris", "unit": "k"}))
    assert not _accepts(tokenizer, anything, call_text("delete_all", {}))
    assert not _accepts(tokenizer, anything, "Sure: " + one)
    single = call_grammar([WEATHER, TIME], None, parallel=False)
    assert _accepts(tokenizer, single, one) and not _accepts(tokenizer, single, one + "\n" + one)
    named = call_grammar([WEATHER, TIME], "get_time", parallel=True)
    assert _accepts(tokenizer, named, call_text("get_time", {}))
    assert not _accepts(tokenizer, named, one) and not _accepts(tokenizer, named, call_text("get_time", {}) * 2)


def _request(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION[:1], **fields})


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tool_choice": "auto"}, "`tool_choice` needs `tools`"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not one of"),
        ({"tools": [WEATHER, WEATHER]}, "same name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "should match pattern"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}
                ]
            },
            "not supported",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "object"),
        ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "answers no earlier tool call"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "`tool_call_id`"),
        ({"messages": [{"role": "user", "content": None}]}, "needs `content`"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "1"}}]}
                ]
            },
            "JSON object",
        ),
    ],
)
def test_bad_tool_requests_are_refused_saying_why(fields, says):
    with pytest.raises(ValueError, match=says):
        _request(**fields)


def test_tool_choice_decides_what_is_parsed_and_held():
    assert _request(tools=[WEATHER]).call_parser.names == {"get_weather"}
    assert _request(tools=[WEATHER]).grammar is None  # auto: free text, calls read from it
    assert _request(tools=[WEATHER], tool_choice="none").call_parser is None
    assert _request(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"}).grammar
    assert _request(tools=[WEATHER], tool_choice="required").grammar
    assert not _request(tools=[WEATHER], parallel_tool_calls=False).call_parser.parallel
    no_arguments = {"type": "function", "function": {"name": "now", "parameters": {}}}
    assert _request(tools=[no_arguments], tool_choice="required").grammar  # {}: arguments are any object


def _tool_record(**changes):
    record = {"tools": [WEATHER], "messages": [dict(m) for m in CONVERSATION]}
    for path, value in changes.items():
        i, key = path.split(".")
        record["messages"][int(i)][key] = value
    return record


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"messages": CONVERSATION}, "'get_weather', which is not one of the record's 'tools'"),
        (
            _tool_record(**{"1.tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": "x"}}]}),
            r"messages\[1\].tool_calls\[0\].function.arguments must be a JSON object",
        ),
        (_tool_record(**{"2.tool_call_id": "call_9"}), "tool_call_id 'call_9' answers no earlier tool call"),
        (_tool_record(**{"0.tool_calls": [CALL]}), "only an assistant message has tool calls"),
        (_tool_record(**{"3.content": None}), r"messages\[3\].content must be a string, got null"),
        ({**_tool_record(), "tools": {"x": 1}}, "'tools' must be an array"),
        ({**_tool_record(), "functions": [WEATHER["function"]]}, "deprecated function calling"),
    ],
)
def test_bad_tool_records_name_the_line_and_the_field(record, says):
    with pytest.raises(DataValidationError, match=says) as caught:
        _validate_record(record, 7, None)
    assert caught.value.line == 7


def test_a_tool_record_is_a_chat_record():
    assert _validate_record(_tool_record(), 1, None) == "chat"


def test_an_evaluate_job_prompts_with_the_tools_and_compares_the_call_as_written(tokenizer):
    from sqft_service.evaluation import _prompt

    record = {"tools": [WEATHER], "messages": CONVERSATION[:2]}
    ids, reference = _prompt(tokenizer, record, "chat")
    assert ids == chat_ids(tokenizer, CONVERSATION[:1], "chat", [WEATHER])
    assert reference == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_an_assistant_turn_of_weight_0_is_context(tokenizer):
    """OpenAI's ``weight``: 0 keeps an assistant turn (here the call) out of the training targets."""
    weighted = [dict(m) for m in CONVERSATION]
    weighted[1]["weight"] = 0
    assert _validate_record({"tools": [WEATHER], "messages": weighted}, 1, None) == "chat"
    segments = chat_segments(weighted, tokenizer, 0, [WEATHER])
    assert [t for t, target in segments if target] == ["It is 18 C in Paris.<|im_end|>"]
    assert "".join(t for t, _ in segments) == "".join(
        t for t, _ in chat_segments(CONVERSATION, tokenizer, 0, [WEATHER])
    )
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 1}]
    assert [t for t, target in chat_segments(plain, tokenizer) if target] == ["Hello<|im_end|>"]


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", "content": "Hello"}], "weight"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 2}], "0 or 1"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": True}], "0 or 1"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}], "of weight 1"),
    ],
)
def test_a_bad_weight_is_refused(messages, says):
    with pytest.raises(DataValidationError, match=says):
        _validate_record({"messages": messages}, 3, None)


def test_an_evaluate_job_counts_the_calls_an_output_gets_right():
    from sqft_service.evaluation import _call_match

    call_record = {"tools": [WEATHER], "messages": CONVERSATION[:2]}
    text_record = {"messages": [CONVERSATION[0], {"role": "assistant", "content": "Sunny."}]}
    outputs = [
        '<tool_call>\n{"arguments": {"city":"Paris"}, "name": "get_weather"}\n</tool_call>',  # same call, other spacing
        call_text("get_weather", {"city": "Rome"}),  # other arguments
        "Sunny.",
    ]
    assert _call_match([call_record, call_record, text_record], outputs) == {
        "tool_call_accuracy": 0.5,
        "n_tool_call_records": 2,
    }
    assert _call_match([text_record], ["Sunny."]) == {}


def test_a_preference_record_with_tools_prefers_one_call_to_another(tokenizer):
    """OpenAI's DPO records take ``input.tools``; the replies may be calls, trained as chat renders them."""
    from sqft_service.config import DatasetSection
    from sqft_service.training.preference import tokenize_pairs

    wrong = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    record = {
        "input": {"messages": CONVERSATION[:1], "tools": [WEATHER]},
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        "non_preferred_output": [{"role": "assistant", "content": None, "tool_calls": [wrong]}],
    }
    assert _validate_record(record, 1, None) == "preference"
    (pair,), dropped = tokenize_pairs([record], tokenizer, DatasetSection())
    assert dropped == 0
    for example, city in ((pair.chosen, "Paris"), (pair.rejected, "Lyon")):
        target = tokenizer.decode(
            [t for t, keep in zip(example.input_ids, example.labels, strict=True) if keep != -100]
        )
        assert target == call_text("get_weather", {"city": city}) + "<|im_end|>"
        assert "<tools>" in tokenizer.decode(example.input_ids)
    unknown = {**record, "input": {"messages": CONVERSATION[:1]}}
    with pytest.raises(DataValidationError, match=r"not one of the record's 'input\.tools'"):
        _validate_record(unknown, 1, None)
