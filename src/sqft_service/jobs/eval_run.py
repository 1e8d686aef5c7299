"""An eval run (OpenAI's Evals API): each row of a data source sampled (``completions``: the run's model
answers messages built from the row) or read with its sample (``jsonl``, or stored chat completions
graded on their own answers), then graded by every grader of the eval; one output item per row appended
to the run's output file.

Sampling and the model graders go through the batch job's ``Answerer``: a row gets the answer
``POST /v1/chat/completions`` would give it, and the greedy or unseeded requests of a chunk (the
graders' always: they answer held to a schema at temperature 0 unless asked otherwise) are generated
together. Rows are flushed as written, so a run interrupted by a crash goes on from the rows it has no
item for; a cancel stops between chunks and keeps the items written.

The summary a run object shows (counts, per-grader results, per-model usage) is read from that file
(``Summary``, added up by ``api/evals/items.py``) while the run goes and after it ends, so it is never
out of step with the items.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..graders import GradingError, grade, judge_request, model_verdict, render_messages, sample_namespace
from ..store.ids import new_id, now
from .kinds import EvalRunParams

OUTPUT_FILE = "eval_output_items.jsonl"
CHUNK_ROWS = 32
PROGRESS_EVERY_S = 2.0
MODEL_GRADERS = ("label_model", "score_model")


def output_path(output_dir: Path) -> Path:
    return output_dir / OUTPUT_FILE


def read_items(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The output items of a run so far, without a last line not yet (or, after a crash, never) ended;
    ``repair`` (the job, before it appends): cut that line off the file too."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if repair and len(whole) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(whole))
    return [json.loads(line) for line in whole.splitlines()]


def rows(p: EvalRunParams) -> Iterator[dict[str, Any]]:
    """The data source's rows (``{"item": ..., "sample"?: ...}``), checked when the run was created."""
    source = p.data_source["source"]
    if source["type"] == "file_content":
        yield from source["content"]
        return
    assert p.input_path is not None
    with Path(p.input_path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


class Summary:
    """A run object's ``result_counts``, ``per_testing_criteria_results`` and ``per_model_usage``, added
    up one output item at a time (the API adds the items a running run appends since it last looked)."""

    def __init__(self) -> None:
        self.counts = {"errored": 0, "failed": 0, "passed": 0}
        self.per: dict[str, dict[str, int]] = {}
        self.usage: dict[str, dict[str, int]] = {}

    def add(self, item: dict[str, Any]) -> None:
        self.counts[{"pass": "passed", "fail": "failed"}.get(item["status"], "errored")] += 1
        self._use(item["sample"])
        for result in item["results"]:
            self._use(result.get("sample"))
            if result.get("error") is None:
                per = self.per.setdefault(result["name"], {"passed": 0, "failed": 0})
                per["passed" if result["passed"] else "failed"] += 1

    def _use(self, sample: dict[str, Any] | None) -> None:
        if not sample or not sample.get("model") or not sample["usage"].get("total_tokens"):
            return  # a row given with its sample, or one the model was never asked
        keys = ("invocation_count", "prompt_tokens", "completion_tokens")
        u = self.usage.setdefault(sample["model"], dict.fromkeys(keys, 0))
        u["invocation_count"] += 1
        u["prompt_tokens"] += sample["usage"].get("prompt_tokens", 0)
        u["completion_tokens"] += sample["usage"].get("completion_tokens", 0)

    def result(self, criteria: list[str], total: int) -> dict[str, Any]:
        per = [{"testing_criteria": name, **self.per.get(name, {"passed": 0, "failed": 0})} for name in criteria]
        per_model = [
            {"model_name": m, **u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"], "cached_tokens": 0}
            for m, u in self.usage.items()
        ]
        counts = {"total": total, **self.counts}
        return {"result_counts": counts, "per_testing_criteria_results": per, "per_model_usage": per_model}


def run_eval(p: EvalRunParams, specs: dict[str, Any], output_dir: Path, sink: Any, should_stop: Any, *,
             threads: int, model_cache_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """Sample and grade every row of ``p``'s data source not yet in the output file.

    Raises:
        JobStopped: ``should_stop()`` turned true between two chunks of rows.
    """
    from ..inference.engine import InferenceEngine
    from .batch import Answerer
    from .worker import JobStopped

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_path(output_dir)
    done = {item["datasource_item_id"] for item in read_items(path, repair=True)}
    if done:
        sink.message(f"resuming: {len(done)} of {p.total} rows already graded")
    engine = InferenceEngine(
        threads=threads, max_queue=0, max_models=max(1, len(specs)), model_cache_dir=model_cache_dir
    )
    grading = _Grading(p, Answerer(engine, specs))
    pending = ((i, row) for i, row in enumerate(rows(p)) if i not in done)
    written, last_report = len(done), time.monotonic()
    with path.open("a", encoding="utf-8") as out:
        while chunk := list(itertools.islice(pending, CHUNK_ROWS)):
            if should_stop():
                raise JobStopped(f"cancelled after {written} of {p.total} rows")
            for item in grading.chunk(chunk):
                out.write(json.dumps(item) + "\n")
                out.flush()  # what a crash leaves is whole items
                written += 1
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                sink.message(f"{written} of {p.total} rows graded")
                last_report = time.monotonic()
    sink.message(f"{written} of {p.total} rows graded")
    return {"output_path": str(path)}


class _Grading:
    def __init__(self, p: EvalRunParams, answerer: Any) -> None:
        self.p, self.answerer = p, answerer
        self.source = p.data_source
        self.sampling = p.sampling  # chat/completions fields (a `responses` run's converted)

    def chunk(self, chunk: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """One output item per row, in the rows' order."""
        sampled = self.source["type"] in ("completions", "responses") and self.source.get("model")
        samples = self._samples(chunk) if sampled else [_given(r) for _, r in chunk]
        verdicts = self._model_verdicts(chunk, samples)
        return [
            self._item(index, row, sample, verdicts[n])
            for n, ((index, row), sample) in enumerate(zip(chunk, samples, strict=True))
        ]

    # ------------------------------------------------------------ sampling
    def _samples(self, chunk: list[tuple[int, dict[str, Any]]]) -> list[tuple[dict[str, Any], dict | None]]:
        """``(sample, namespace)`` per row: the output item's sample, and what templates read as ``sample``
        (None: the row could not be sampled; the sample's ``error`` says why)."""
        model, lines, out = self.source["model"], [], {}
        for index, row in chunk:
            try:
                messages = self._messages(row["item"])
            except GradingError as exc:
                out[index] = (self._sample(model, [], None, {"code": "invalid_item", "message": str(exc)}), None)
                continue
            body = {"model": model, "messages": messages, **self.sampling}
            lines.append({"custom_id": str(index), "body": body})
        for custom_id, status, body in self.answerer.chunk(lines) if lines else []:
            messages = next(line["body"]["messages"] for line in lines if line["custom_id"] == custom_id)
            if status != 200:
                error = {"code": body["error"].get("code") or "sample_failed", "message": body["error"]["message"]}
                out[int(custom_id)] = (self._sample(model, messages, None, error), None)
                continue
            choice = body["choices"][0]
            sample = self._sample(model, messages, body, None)
            ns = sample_namespace(choice["message"].get("content"), choice["message"].get("tool_calls"))
            out[int(custom_id)] = (sample, {**ns, "model": model, "choices": body["choices"]})
        return [out[index] for index, _ in chunk]

    def _messages(self, item: dict[str, Any]) -> list[dict[str, str]]:
        stored = self.source["source"]["type"] == "stored_completions"  # a stored completion's row: its input
        default = {"type": "item_reference", "item_reference": "item.input" if stored else "item.messages"}
        spec = self.source.get("input_messages") or default
        if spec["type"] == "template":
            return render_messages(spec["template"], item, None)
        value: Any = item
        for key in spec["item_reference"].split(".")[1:]:
            if not isinstance(value, dict) or key not in value:
                raise GradingError(f"the row has no `{spec['item_reference']}` (the run's input_messages)")
            value = value[key]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise GradingError(f"`{spec['item_reference']}` is neither text nor a list of messages")
        return value

    def _sample(self, model: str, messages: list, body: dict | None, error: dict | None) -> dict[str, Any]:
        usage = (body or {}).get("usage") or {}
        choice = (body or {}).get("choices", [{}])[0]
        message = choice.get("message") or {}
        return {
            "input": [{"role": m.get("role", ""), "content": _text(m.get("content"))} for m in messages],
            "output": [{"role": "assistant", "content": message.get("content"), **_calls(message)}] if body else [],
            "finish_reason": choice.get("finish_reason") or "",
            "model": model,
            "usage": {
                "prompt_tokens": usage.get("prompt_tokens", 0),
                "completion_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
                "cached_tokens": 0,
            },
            "error": error,
            "temperature": self.sampling.get("temperature", 1.0),
            "max_completion_tokens": self.sampling.get("max_completion_tokens"),
            "top_p": self.sampling.get("top_p", 1.0),
            "seed": self.sampling.get("seed"),
        }

    # ------------------------------------------------------------ grading
    def _model_verdicts(self, chunk: list, samples: list) -> list[dict[str, Any]]:
        """Per row, the model graders' ``{name: (score, passed, result, sample) | GradingError}``, asked together."""
        verdicts: list[dict[str, Any]] = [{} for _ in chunk]
        lines, asked = [], {}
        for n, ((_, row), (_, ns)) in enumerate(zip(chunk, samples, strict=True)):
            if ns is None:
                continue
            for grader in self.p.testing_criteria:
                if grader["type"] not in MODEL_GRADERS:
                    continue
                try:
                    messages = render_messages(grader["input"], row["item"], ns)
                except GradingError as exc:
                    verdicts[n][grader["name"]] = exc
                    continue
                custom_id = f"{n}:{grader['name']}"
                asked[custom_id] = (n, grader, messages)
                lines.append({"custom_id": custom_id, "body": judge_request(grader, messages)})
        for custom_id, status, body in self.answerer.chunk(lines) if lines else []:
            n, grader, messages = asked[custom_id]
            if status != 200:
                verdicts[n][grader["name"]] = GradingError(f"grader `{grader['name']}`: {body['error']['message']}")
                continue
            answer = body["choices"][0]["message"].get("content") or ""
            sample = self._sample(grader["model"], messages, body, None)
            try:
                verdicts[n][grader["name"]] = (*model_verdict(grader, answer), sample)
            except GradingError as exc:
                verdicts[n][grader["name"]] = exc
        return verdicts

    def _item(self, index: int, row: dict, sample: tuple[dict, dict | None], verdicts: dict) -> dict[str, Any]:
        sample_obj, ns = sample
        results, errored = [], ns is None
        for grader in self.p.testing_criteria:
            result: dict[str, Any] = {"name": grader["name"], "type": grader["type"], "score": 0.0, "passed": False}
            result.update(sample=None, error=None)
            try:
                if ns is None:
                    raise GradingError("the row has no sample to grade")
                if grader["type"] in MODEL_GRADERS:
                    verdict = verdicts[grader["name"]]
                    if isinstance(verdict, GradingError):
                        raise verdict
                    score, passed, value, grader_sample = verdict
                    result.update(score=score, passed=passed, result=value, sample=grader_sample)
                else:
                    score, passed = grade(grader, row["item"], ns)
                    result.update(score=score, passed=passed)
            except GradingError as exc:
                result["error"], errored = str(exc), True
            results.append(result)
        status = "error" if errored else "pass" if all(r["passed"] for r in results) else "fail"
        if errored and sample_obj.get("error") is None:
            message = next(r["error"] for r in results if r["error"]) if ns is not None else "no sample"
            sample_obj = {**sample_obj, "error": {"code": "grading_failed", "message": message}}
        return {
            "object": "eval.run.output_item",
            "id": new_id("outputitem", "_"),
            "run_id": self.p.run_id,
            "eval_id": self.p.eval_id,
            "created_at": now(),
            "status": status,
            "datasource_item_id": index,
            "datasource_item": row["item"],
            "results": results,
            "sample": sample_obj,
        }


def _given(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A ``jsonl`` row's own sample: the output item's sample and the templates' ``sample``."""
    given = row.get("sample")
    if given is None:
        error = {"code": "no_sample", "message": "a jsonl row is graded on its `sample`, and this row has none"}
        return _plain_sample("", error), None
    ns = dict(given)
    if "output_text" not in ns:  # a chat completion: its first choice's message
        choices = ns.get("choices")
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = first.get("message") or {}
        ns.update(sample_namespace(message.get("content"), message.get("tool_calls")))
    text = ns.get("output_text") if isinstance(ns.get("output_text"), str) else json.dumps(ns.get("output_text"))
    sample = _plain_sample(str(ns.get("model", "")), None)
    sample["output"] = [{"role": "assistant", "content": text}]
    return sample, ns


def _plain_sample(model: str, error: dict | None) -> dict[str, Any]:
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
    return {"input": [], "output": [], "finish_reason": "", "model": model, "usage": usage, "error": error}


def _calls(message: dict[str, Any]) -> dict[str, Any]:
    return {"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in ("text", "image_url") for p in content
    ):
        # A message with images: its text, each image as "[image]" (the row's item keeps its URL).
        return "".join(p["text"] if p["type"] == "text" else "[image]" for p in content)
    return json.dumps(content) if content is not None else ""
