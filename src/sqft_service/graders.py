"""Graders of OpenAI's Evals API and the templates they read (torch-free: the API checks a grader with
this module when an eval is created, the ``eval_run`` job grades with it).

A template (``"{{ item.answer }}"``, ``"{{ sample.output_text }}"``) is Jinja in a sandbox, held to
text and values to fill in (``check_template``): the data a client sends is filled in, never run.
``item`` is a data source row, ``sample`` what the model answered: ``output_text``, ``output_json``
(that text parsed, or null) and ``output_tools`` (its tool calls).

* ``string_check``: ``eq`` / ``ne`` / ``like`` (contains) / ``ilike`` (contains, any case); score 1 or 0.
* ``text_similarity``: a score in [0, 1] against ``pass_threshold``: ``fuzzy_match`` (rapidfuzz's
  normalized Indel similarity), ``bleu`` (NLTK's sentence BLEU, method-1 smoothing, up to 4-grams,
  re-weighted for shorter texts), ``gleu`` (NLTK's sentence GLEU), ``rouge_1``…``rouge_5`` and
  ``rouge_l`` (Google's ``rouge-score`` F-measure). The word metrics read the texts as ``rouge-score``
  tokenizes them (lower case, letters and digits), so they agree on what a word is; ``fuzzy_match``
  compares the characters as they are.
* ``label_model`` / ``score_model``: a model of this service reads the grader's ``input`` messages and
  answers held to a JSON schema (``{"result": <one of labels>}`` / ``{"result": <number in range>}``),
  so even a small model always gives a label or a score it may give (``jobs/eval_run.py`` asks it).
* ``multi`` (reinforcement fine-tuning and ``graders/run``): named graders of the kinds above, their
  scores combined by a formula (``calculate_output``, ``grader_formula.py``).
"""

from __future__ import annotations

import json
import math
from functools import cache, lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from .errors import UserError
from .grader_formula import FormulaValueError, evaluate_formula

NAMESPACES = {"item", "sample"}
MODEL_GRADERS = ("label_model", "score_model")  # graders whose judge is a model
MULTI = "multi"
ROUGE_METRICS = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", *ROUGE_METRICS)
MAX_SIMILARITY_CHARS = 100_000
# Named by OpenAI, refused here: METEOR needs the WordNet corpus (a download), cosine an embeddings model.
UNOFFERED_METRICS = {"meteor": "needs the WordNet corpus", "cosine": "needs an embeddings model"}


class _Environment(SandboxedEnvironment):
    """``item.items`` is the row's ``items`` field, not the dict method Jinja would find first."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict):
            return obj[attribute] if attribute in obj else self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def _finalize(value: Any) -> Any:
    """A value that is not text is filled in as JSON (``{{ item.tags }}`` → ``["a", "b"]``); an undefined
    one is left for StrictUndefined to refuse."""
    if isinstance(value, str | Undefined):
        return value
    return json.dumps(value, default=str)


_ENV = _Environment(undefined=StrictUndefined, autoescape=False, finalize=_finalize, keep_trailing_newline=True)
_ENV.globals.clear()  # range, cycler…: a template reads the row and the sample, nothing else


# What a template may hold: text and ``{{ name.field[0]["key"] }}`` values. No loops, filters, calls or
# operators: even in Jinja's sandbox, ``{{ "x" * 10**9 }}`` or nested loops over a row would cost the
# API process (which renders templates for ``graders/run``) memory and time a client chooses.
_TEMPLATE_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Const,
)


@lru_cache(maxsize=1024)
def _compiled(text: str) -> Any:
    return _ENV.from_string(text)


def check_template(text: str, param: str) -> None:
    """A 400 naming ``param`` for a template that does not parse, holds more than values to fill in, or
    reads a name other than item/sample."""
    try:
        tree = _ENV.parse(text)
    except TemplateError as exc:
        raise UserError(f"the template does not parse: {exc}", param=param) from None
    if stray := next((n for n in tree.find_all(nodes.Node) if not isinstance(n, _TEMPLATE_NODES)), None):
        raise UserError(
            f"a template fills in values (`{{{{ item.field }}}}`, `{{{{ sample.output_text }}}}`), and this one "
            f"has a {type(stray).__name__.lower()}",
            param=param,
        )
    if unknown := sorted(meta.find_undeclared_variables(tree) - NAMESPACES):
        raise UserError(f"a template reads `item` and `sample`, not `{unknown[0]}`", param=param)


def template_names(text: str) -> set[str]:
    """The top-level names a (checked) template reads: ``{"item"}``, ``{"item", "sample"}``…"""
    return set(meta.find_undeclared_variables(_ENV.parse(text)))


def render(text: str, item: dict[str, Any], sample: dict[str, Any] | None) -> str:
    """The template filled with this row and sample.

    Raises:
        TemplateVariableError: the template reads a field the row (or the sample) does not have.
    """
    try:
        return _compiled(text).render(item=item, sample=sample if sample is not None else {})
    except TemplateError as exc:
        raise TemplateVariableError(f"template {text[:80]!r}: {exc}") from None


class GradingError(Exception):
    """A row that could not be graded (a missing field, a failed sample): the row counts as errored."""


class TemplateVariableError(GradingError):
    """A template read a field the row (or the sample) does not have."""


def sample_namespace(text: str | None, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What a template's ``sample`` holds for an answer."""
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    tools = [c.get("function", c) for c in tool_calls or []]
    return {"output_text": text or "", "output_json": parsed, "output_tools": tools}


def string_check(value: str, reference: str, operation: str) -> float:
    match operation:
        case "eq":
            return float(value == reference)
        case "ne":
            return float(value != reference)
        case "like":
            return float(reference in value)
        case "ilike":
            return float(reference.lower() in value.lower())
    raise ValueError(operation)


@cache
def _rouge_scorer(metric: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([ROUGE_METRICS[metric]])


def _words(text: str) -> list[str]:
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


def text_similarity(value: str, reference: str, metric: str) -> float:
    """The score in [0, 1] of ``value`` against ``reference`` by ``metric`` (one of SIMILARITY_METRICS).

    Raises:
        GradingError: a text is over MAX_SIMILARITY_CHARS (the character metrics cost the product of
            the lengths).
    """
    if max(len(value), len(reference)) > MAX_SIMILARITY_CHARS:
        raise GradingError(f"a text_similarity grader compares texts of up to {MAX_SIMILARITY_CHARS} characters")
    if metric == "fuzzy_match":
        from rapidfuzz.fuzz import ratio

        return ratio(value, reference) / 100.0
    if metric in ROUGE_METRICS:
        score = _rouge_scorer(metric).score(reference, value)
        return float(score[ROUGE_METRICS[metric]].fmeasure)
    hypothesis, references = _words(value), [_words(reference)]
    if not hypothesis or not references[0]:
        return float(hypothesis == references[0])
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        smoothing = SmoothingFunction().method1
        return float(sentence_bleu(references, hypothesis, smoothing_function=smoothing, auto_reweigh=True))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu(references, hypothesis))
    raise ValueError(metric)


def result_schema(grader: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a model grader's answer is held to."""
    if grader["type"] == "label_model":
        result: dict[str, Any] = {"type": "string", "enum": grader["labels"]}
    else:
        low, high = grader.get("range") or (0.0, 1.0)
        result = {"type": "number", "minimum": low, "maximum": high}
    return {"type": "object", "properties": {"result": result}, "required": ["result"], "additionalProperties": False}


GRADER_MAX_TOKENS = 128  # a judge's answer is one small JSON object (result_schema)


def judge_request(grader: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat completion request a model grader's judge answers: its messages, held to
    ``result_schema``, greedy unless the grader's ``sampling_params`` say otherwise."""
    params = grader.get("sampling_params") or {}
    body: dict[str, Any] = {
        "model": grader["model"],
        "messages": messages,
        "temperature": params.get("temperature") if params.get("temperature") is not None else 0.0,
        "max_completion_tokens": params.get("max_completions_tokens") or GRADER_MAX_TOKENS,
        "response_format": {"type": "json_schema", "json_schema": {"name": "grade", "schema": result_schema(grader)}},
    }
    for key in ("top_p", "seed"):
        if params.get(key) is not None:
            body[key] = params[key]
    return body


def content_templates(content: Any) -> list[tuple[str, str]]:
    """``(where, template)`` of a template message's content: text, one part or a list of parts
    (``input_text``'s ``text``, ``input_image``'s ``image_url``); ``where`` suffixes its param."""
    if isinstance(content, str):
        return [("", content)]
    parts = [("", content)] if isinstance(content, dict) else [(f"[{k}]", part) for k, part in enumerate(content)]
    return [
        (f"{at}.text", part["text"]) if part["type"] == "input_text" else (f"{at}.image_url", part["image_url"])
        for at, part in parts
    ]


def render_content(content: Any, item: dict[str, Any], sample: dict[str, Any] | None) -> Any:
    """A template message's content filled in, as chat takes it: text, or (with images) chat content parts."""
    if isinstance(content, str):
        return render(content, item, sample)
    parts = [content] if isinstance(content, dict) else content
    if all(part["type"] == "input_text" for part in parts):
        return "".join(render(part["text"], item, sample) for part in parts)
    return [
        {"type": "text", "text": render(part["text"], item, sample)}
        if part["type"] == "input_text"
        else {
            "type": "image_url",
            "image_url": {"url": render(part["image_url"], item, sample), "detail": part.get("detail", "auto")},
        }
        for part in parts
    ]


def render_messages(
    messages: list[dict[str, Any]], item: dict[str, Any], sample: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Template messages (a run's ``input_messages``, a judge's ``input``) filled with the row and sample;
    content with ``input_image`` parts becomes chat's ``image_url`` parts (for image-text models).

    Raises:
        TemplateVariableError: a template reads a field the row or the sample does not have.
    """
    return [{"role": m["role"], "content": render_content(m["content"], item, sample)} for m in messages]


def model_verdict(grader: dict[str, Any], answer: str) -> tuple[float, bool, Any]:
    """``(score, passed, result)`` of a model grader's answer (held to ``result_schema``).

    Raises:
        GradingError: the answer is not that schema's JSON (the grader ran out of tokens).
    """
    try:
        result = json.loads(answer)["result"]
    except (ValueError, KeyError, TypeError):
        raise GradingError(f"grader `{grader['name']}` gave no result: {answer[:200]!r}") from None
    if grader["type"] == "label_model":
        passed = result in grader["passing_labels"]
        return float(passed), passed, result
    score = float(result)
    if not math.isfinite(score):
        raise GradingError(f"grader `{grader['name']}` gave a score that is not a number: {answer[:200]!r}")
    threshold = grader.get("pass_threshold")
    return score, threshold is None or score >= threshold, score


def grade(grader: dict[str, Any], item: dict[str, Any], sample: dict[str, Any] | None) -> tuple[float, bool]:
    """``(score, passed)`` of a string_check or text_similarity grader on one row.

    Raises:
        GradingError: a template reads a field the row does not have.
    """
    value, reference = render(grader["input"], item, sample), render(grader["reference"], item, sample)
    if grader["type"] == "string_check":
        score = string_check(value, reference, grader["operation"])
        return score, score == 1.0
    score = text_similarity(value, reference, grader["evaluation_metric"])
    return score, score >= grader["pass_threshold"]


def sub_graders(grader: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The graders a grader's score is made of, by the name its formula reads them: a multi grader's
    graders, or the grader itself."""
    return grader["graders"] if grader["type"] == MULTI else {grader["name"]: grader}


def judge_models(grader: dict[str, Any]) -> list[str]:
    """The judge models a grader's model graders name (a multi grader's, once each, in order)."""
    models = [g["model"] for g in sub_graders(grader).values() if g["type"] in MODEL_GRADERS]
    return list(dict.fromkeys(models))


def combine(grader: dict[str, Any], scores: dict[str, float]) -> float:
    """A grader's score from its sub-graders' (``sub_graders``): a multi grader's formula, or the one score.

    Raises:
        GradingError: the formula has no value for these scores (a division by zero…).
    """
    if grader["type"] != MULTI:
        return scores[grader["name"]]
    try:
        return evaluate_formula(grader["calculate_output"], scores)
    except FormulaValueError as exc:
        raise FormulaGradingError(str(exc)) from None


class FormulaGradingError(GradingError):
    """A multi grader's formula had no value for its graders' scores."""
