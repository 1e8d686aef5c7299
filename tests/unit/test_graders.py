"""Graders of the Evals API (``graders.py``) and the eval run's item file (``jobs/eval_run.py``)."""

from __future__ import annotations

import json

import pytest

from sqft_service.errors import UserError
from sqft_service.graders import (
    GradingError,
    check_template,
    grade,
    model_verdict,
    render,
    result_schema,
    sample_namespace,
    string_check,
    text_similarity,
)
from sqft_service.jobs.eval_run import Summary, output_path, read_items, run_eval
from sqft_service.jobs.kinds import EvalRunParams


@pytest.mark.parametrize(
    ("value", "reference", "operation", "score"),
    [
        ("Paris", "Paris", "eq", 1.0),
        ("paris", "Paris", "eq", 0.0),
        ("paris", "Paris", "ne", 1.0),
        ("It is Paris.", "Paris", "like", 1.0),
        ("It is PARIS.", "Paris", "like", 0.0),
        ("It is PARIS.", "Paris", "ilike", 1.0),
    ],
)
def test_string_check(value, reference, operation, score):
    assert string_check(value, reference, operation) == score


def test_text_similarity_metrics_give_their_known_values():
    assert text_similarity("hallo", "hello", "fuzzy_match") == pytest.approx(0.8)  # Indel: 1 - 2/10
    # 5 of 6 unigrams shared each way: F = 5/6; the longest common subsequence is 5 words too
    pair = ("the cat is on the mat", "the cat sat on the mat")
    assert text_similarity(*pair, "rouge_1") == pytest.approx(5 / 6)
    assert text_similarity(*pair, "rouge_l") == pytest.approx(5 / 6)
    assert text_similarity(*pair, "rouge_2") == pytest.approx(3 / 5)  # the cat, on the, the mat of 5 bigrams
    for metric in ("bleu", "gleu", "rouge_l"):  # words: case and punctuation aside
        assert text_similarity("The cat sat.", "the cat sat", metric) == pytest.approx(1.0), metric
        assert text_similarity("dog", "the cat sat", metric) < 0.2, metric
    assert text_similarity("The cat sat.", "the cat sat", "fuzzy_match") == pytest.approx(20 / 23)  # characters
    assert 0.0 < text_similarity(*pair, "bleu") < 1.0
    assert text_similarity("", "", "bleu") == 1.0 and text_similarity("x", "", "gleu") == 0.0
    with pytest.raises(GradingError, match="100000 characters"):
        text_similarity("a" * 100_001, "a", "fuzzy_match")


def test_templates_fill_rows_in_a_sandbox():
    item = {"question": "2+2?", "items": ["a", "b"], "n": 4}
    assert render("Q: {{ item.question }} ({{ item.n }})", item, None) == "Q: 2+2? (4)"
    assert render("{{ item.items }}", item, None) == '["a", "b"]'  # the row's field, as JSON; not dict.items
    assert render("{{ sample.output_text }}", item, {"output_text": "4"}) == "4"
    with pytest.raises(GradingError, match="answer"):
        render("{{ item.answer }}", item, None)
    with pytest.raises(GradingError):  # the sandbox: no way from a row to Python's internals
        render("{{ item.question.__class__.__mro__[1].__subclasses__() }}", item, None)
    with pytest.raises(UserError, match="does not parse") as bad:
        check_template("{{ item.question ", "testing_criteria[0].input")
    assert bad.value.param == "testing_criteria[0].input"
    with pytest.raises(UserError, match="`cycler`"):
        check_template("{{ cycler }}", "x")
    for costly in ('{{ "x" * 10**9 }}', "{% for a in item.l %}{% for b in item.l %}.{% endfor %}{% endfor %}"):
        with pytest.raises(UserError, match="fills in values"):  # no work a client chooses
            check_template(costly, "x")
    check_template("{{ item.a }} {{ sample.output_json.b }}", "x")


def test_sample_namespace_reads_json_and_calls():
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    ns = sample_namespace('{"a": 1}', calls)
    assert ns == {"output_text": '{"a": 1}', "output_json": {"a": 1}, "output_tools": [calls[0]["function"]]}
    assert sample_namespace("not json", None)["output_json"] is None


def test_graders_on_a_row():
    exact = {"type": "string_check", "input": "{{ sample.output_text }}", "reference": "{{ item.a }}"}
    exact["operation"] = "eq"
    assert grade(exact, {"a": "x"}, {"output_text": "x"}) == (1.0, True)
    fuzzy = {**exact, "type": "text_similarity", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.9}
    score, passed = grade(fuzzy, {"a": "hello"}, {"output_text": "hallo"})
    assert score == pytest.approx(0.8) and not passed


def test_model_verdicts():
    label = {"type": "label_model", "name": "j", "labels": ["good", "bad"], "passing_labels": ["good"]}
    assert model_verdict(label, '{"result": "good"}') == (1.0, True, "good")
    assert model_verdict(label, '{"result": "bad"}') == (0.0, False, "bad")
    assert result_schema(label)["properties"]["result"]["enum"] == ["good", "bad"]
    score = {"type": "score_model", "name": "s", "range": [1, 5], "pass_threshold": 4}
    assert model_verdict(score, '{"result": 4.5}') == (4.5, True, 4.5)
    assert model_verdict(score, '{"result": 2}')[1] is False
    assert result_schema(score)["properties"]["result"] == {"type": "number", "minimum": 1, "maximum": 5}
    with pytest.raises(GradingError, match="gave no result"):
        model_verdict(score, '{"result": 4')  # cut off by the token limit


def summarize(items: list[dict], criteria: list[str], total: int) -> dict:
    """A run's summary from all its items at once (what the API's index adds up as they arrive)."""
    summary = Summary()
    for item in items:
        summary.add(item)
    return summary.result(criteria, total)


class _Sink:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str, **_: object) -> None:
        self.messages.append(text)


def _params(rows: list[dict]) -> EvalRunParams:
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.a }}",
        "operation": "eq",
    }
    return EvalRunParams(
        eval_id="eval_x",
        run_id="evalrun_x",
        name="n",
        testing_criteria=[grader],
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows}},
        total=len(rows),
        models={},
    )


def test_a_run_interrupted_mid_line_goes_on_without_grading_a_row_twice(tmp_path):
    rows = [{"item": {"a": str(n % 3)}, "sample": {"output_text": "0"}} for n in range(70)]
    rows[5] = {"item": {"b": "no a"}, "sample": {"output_text": "0"}}  # its template fails: errored
    p = _params(rows)
    run_eval(p, {}, tmp_path, _Sink(), lambda: False, threads=1, model_cache_dir=None)
    whole = read_items(output_path(tmp_path))
    assert [i["datasource_item_id"] for i in whole] == list(range(70))
    # a crash after 40 items, in the middle of the 41st
    text = output_path(tmp_path).read_text().splitlines(keepends=True)
    output_path(tmp_path).write_text("".join(text[:40]) + text[40][:25])
    assert len(read_items(output_path(tmp_path))) == 40  # the API's read leaves the file alone
    sink = _Sink()
    run_eval(p, {}, tmp_path, sink, lambda: False, threads=1, model_cache_dir=None)
    again = read_items(output_path(tmp_path))
    assert sorted(i["datasource_item_id"] for i in again) == list(range(70))
    assert sink.messages[0] == "resuming: 40 of 70 rows already graded"
    assert [(i["status"], i["results"][0]["score"]) for i in again] == [
        (i["status"], i["results"][0]["score"]) for i in whole
    ]
    summary = summarize(again, ["exact"], 70)
    passed = sum(1 for n in range(70) if n != 5 and n % 3 == 0)
    assert summary["result_counts"] == {"total": 70, "errored": 1, "failed": 69 - passed, "passed": passed}
    assert summary["per_testing_criteria_results"] == [
        {"testing_criteria": "exact", "passed": passed, "failed": 69 - passed}
    ]
    assert summary["per_model_usage"] == []  # the samples were given, no model was asked
    errored = again[5]
    assert errored["status"] == "error" and "b" in json.dumps(errored["datasource_item"])
    assert "item" in errored["results"][0]["error"] and errored["sample"]["error"]["code"] == "grading_failed"


def test_a_cancel_stops_between_chunks(tmp_path):
    from sqft_service.jobs.worker import JobStopped

    rows = [{"item": {"a": "0"}, "sample": {"output_text": "0"}} for _ in range(100)]
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # two chunks, then stop

    with pytest.raises(JobStopped, match="after 64 of 100 rows"):
        run_eval(_params(rows), {}, tmp_path, _Sink(), stop, threads=1, model_cache_dir=None)
    assert len(read_items(output_path(tmp_path))) == 64


def test_the_api_reads_a_running_runs_items_as_they_are_appended(tmp_path):
    from sqft_service.api.evals.items import RunItems

    rows = [{"item": {"a": str(n % 2)}, "sample": {"output_text": "0"}} for n in range(40)]
    run_eval(_params(rows), {}, tmp_path, _Sink(), lambda: False, threads=1, model_cache_dir=None)
    path = output_path(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:10]) + lines[10][:30])  # the job is writing line 11
    items = RunItems()
    page, more = items.page(path, after=None, limit=4, descending=False, status=None)
    assert [i["datasource_item_id"] for i in page] == [0, 1, 2, 3] and more
    assert items.summary(path, ["exact"], 40)["result_counts"] == {"total": 40, "errored": 0, "failed": 5, "passed": 5}
    with path.open("ab") as handle:  # it goes on
        handle.write(lines[10][30:] + b"".join(lines[11:]))
    fails, more = items.page(path, after=None, limit=100, descending=True, status="fail")
    assert [i["datasource_item_id"] for i in fails] == list(range(39, 0, -2)) and not more
    assert items.get(path, fails[0]["id"]) == fails[0]
    assert items.summary(path, ["exact"], 40) == summarize(read_items(path), ["exact"], 40)
    path.write_bytes(b"".join(lines[:3]))  # cut back: read again from the start
    assert items.summary(path, ["exact"], 40)["result_counts"]["passed"] == 2
    assert items.get(path, fails[0]["id"]) is None
