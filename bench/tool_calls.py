"""Function calling learned through the service: SmolLM2-135M-Instruct fine-tuned on chat records with
tools (OpenAI's fine-tuning form), compared with its base on held-out questions, through the service's
own routes.

Two tools are offered with every question: ``calculator(expression)`` and ``lookup(topic)``. Training
records (``--train`` of each kind, LoRA, 1 epoch):
* a GSM8K question → a call of ``calculator`` with the question's first calculation (GSM8K's
  ``<<48/2=24>>`` annotations: ``48/2``);
* an ARC-Easy question → its answer as text (no call: a question the model answers itself).
Held-out (``--heldout`` of each, never trained on), answered greedily by the batch API (``/v1/batches``,
whose greedy lines are generated together):
* GSM8K with ``tool_choice: auto``: how often the model calls ``calculator``, and with the right
  calculation (the same text, spaces aside; or the same value);
* ARC-Easy with ``tool_choice: auto``: how often it answers in text, as it should (no call);
* GSM8K with ``tool_choice: required``: the call is held to the schema whatever the model (every call
  parses), so what is left to measure is whether its calculation is right.
Writes ``bench/results/<date>-tool-calls-<host>.json``. Run from the repository root:
``.venv/bin/python -m bench.tool_calls [--train 300] [--heldout 60]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench.load.server import ServerProcess
from bench.throughput.inputs import find_data
from bench.throughput.report import write_machine_results

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (+ - * / and parentheses) and return its value.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": 48}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a topic up in an encyclopedia.",
        "parameters": {
            "type": "object",
            "properties": {"topic": {"type": "string", "maxLength": 48}},
            "required": ["topic"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [CALCULATOR, LOOKUP]
_CALC = re.compile(r"<<([^=<>]+)=")


def first_calculation(answer: str) -> str | None:
    found = _CALC.search(answer)
    return found.group(1).strip() if found else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def value(expression: str) -> float | None:
    """An arithmetic expression's value (numbers, + - * /, parentheses); None when it is anything else."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError("not arithmetic")

    try:
        return walk(ast.parse(expression.replace("x", "*").replace(",", ""), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
        return None


def _records(count: int, skip_last: int) -> tuple[list[dict], list[dict]]:
    """GSM8K questions with a calculation and ARC-Easy questions: the first ``count`` of each to train on,
    the last ``skip_last`` of each held out."""
    gsm_path, arc_path = find_data("gsm8k_train.jsonl"), find_data("arce_train_instruct.json")
    if gsm_path is None or arc_path is None:
        raise SystemExit("../shared/data/gsm8k_train.jsonl or arce_train_instruct.json is missing")
    gsm = [json.loads(line) for line in gsm_path.read_text().splitlines() if line.strip()]
    gsm = [(r["question"], calc) for r in gsm if (calc := first_calculation(r["answer"])) and value(calc) is not None]
    arc = [(r["instruction"], r["output"]) for r in json.loads(arc_path.read_text())]
    assert count + skip_last <= min(len(gsm), len(arc)), "training and held-out records would overlap"
    train = []
    for i, ((question, calc), (asked, answer)) in enumerate(zip(gsm[:count], arc[:count], strict=True)):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": calc})},
        }
        train.append(
            {
                "tools": TOOLS,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                ],
            }
        )
        train.append(
            {"tools": TOOLS, "messages": [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]}
        )
    held = [{"kind": "gsm8k", "question": q, "calculation": c} for q, c in gsm[-skip_last:]]
    held += [{"kind": "arce", "question": q} for q, _ in arc[-skip_last:]]
    return train, held


def _upload(url: str, path: Path, purpose: str) -> str:
    with path.open("rb") as handle:
        response = httpx.post(f"{url}/v1/files", files={"file": handle}, data={"purpose": purpose}, timeout=60)
    response.raise_for_status()
    return response.json()["id"]


def _wait(url: str, what: str, ident: str, done: tuple[str, ...]) -> dict:
    while (got := httpx.get(f"{url}/v1/{what}/{ident}", timeout=30).json())["status"] not in done:
        time.sleep(2)
    return got


def _fine_tune(url: str, gguf: Path, train: list[dict], root: Path) -> tuple[str, float]:
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    body = {
        "model": str(gguf),
        "training_file": _upload(url, path, "fine-tune"),
        "suffix": "tools",
        "Training": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-4},
    }
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, timeout=30).json()
    t0 = time.monotonic()
    done = _wait(url, "fine_tuning/jobs", job["id"], ("succeeded", "failed", "cancelled"))
    if done["status"] != "succeeded":
        raise SystemExit(f"the fine-tuning job ended {done['status']}: {done.get('error')}")
    return done["fine_tuned_model"], time.monotonic() - t0


def _answers(url: str, model: str, held: list[dict], choice: str, root: Path) -> tuple[list[dict], float]:
    """Each held-out question's chat answer (its message), from one batch."""
    lines = []
    for i, rec in enumerate(held):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": rec["question"]}],
            "tools": TOOLS,
            "tool_choice": choice,
            "temperature": 0,
            "max_tokens": 64,
        }
        lines.append({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": body})
    path = root / f"batch-{len(list(root.glob('batch-*')))}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    t0 = time.monotonic()
    batch = httpx.post(
        f"{url}/v1/batches",
        json={
            "input_file_id": _upload(url, path, "batch"),
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
        timeout=30,
    ).json()
    done = _wait(url, "batches", batch["id"], ("completed", "failed", "cancelled", "expired"))
    if done["status"] != "completed" or done["request_counts"]["failed"]:
        raise SystemExit(f"the batch ended {done['status']}: {done.get('errors') or done['request_counts']}")
    rows = httpx.get(f"{url}/v1/files/{done['output_file_id']}/content", timeout=60).text.splitlines()
    by_id = {(row := json.loads(line))["custom_id"]: row["response"]["body"]["choices"][0] for line in rows}
    return [by_id[str(i)] for i in range(len(held))], time.monotonic() - t0


def _score(held: list[dict], answers: list[dict]) -> dict[str, Any]:
    gsm = [(rec, a) for rec, a in zip(held, answers, strict=True) if rec["kind"] == "gsm8k"]
    arc = [a for rec, a in zip(held, answers, strict=True) if rec["kind"] == "arce"]
    any_call, called, same_text, same_value = 0, 0, 0, 0
    for rec, answer in gsm:
        calls = answer["message"].get("tool_calls") or []
        any_call += bool(calls)
        if not calls or calls[0]["function"]["name"] != "calculator":
            continue
        called += 1
        expression = str(json.loads(calls[0]["function"]["arguments"]).get("expression", ""))
        same_text += expression.replace(" ", "") == rec["calculation"].replace(" ", "")
        got, want = value(expression), value(rec["calculation"])
        same_value += got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    n = max(len(gsm), 1)
    figures = {
        "makes_a_call": any_call / n,
        "calls_calculator": called / n,
        "right_calculation": same_text / n,
        "right_value": same_value / n,
    }
    if arc:
        figures["arce_answered_in_text"] = sum(not a["message"].get("tool_calls") for a in arc) / len(arc)
    return {k: round(v, 3) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="training records of each kind")
    parser.add_argument("--heldout", type=int, default=60, help="held-out questions of each kind")
    args = parser.parse_args()
    from sqft_service.model_access import smollm2_dir

    train, held = _records(args.train, args.heldout)
    gsm_only = [rec for rec in held if rec["kind"] == "gsm8k"]
    gguf = next(smollm2_dir().glob("*.gguf"))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sqft-tools-") as tmp:
        root = Path(tmp)
        server = ServerProcess(root / "data", env={}, log_path=root / "server.log")
        server.start()
        try:
            model, train_s = _fine_tune(server.url, gguf, train, root)
            for name, served in (("base", str(gguf)), ("fine-tuned", model)):
                answers, seconds = _answers(server.url, served, held, "auto", root)
                rows[f"{name}, auto"] = {**_score(held, answers), "seconds": round(seconds, 1)}
                answers, seconds = _answers(server.url, served, gsm_only, "required", root)
                rows[f"{name}, required"] = {**_score(gsm_only, answers), "seconds": round(seconds, 1)}
        finally:
            server.stop()
    print(f"fine-tuned {model} on {len(train)} records in {train_s:.0f} s")
    print(
        "| model, tool_choice | GSM8K: a call | calculator | right calculation | right value "
        "| ARC-E: answered in text | s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        arc = f"{r['arce_answered_in_text']:.2f}" if "arce_answered_in_text" in r else "-"
        print(
            f"| {name} | {r['makes_a_call']:.2f} | {r['calls_calculator']:.2f} | {r['right_calculation']:.2f} "
            f"| {r['right_value']:.2f} "
            f"| {arc} | {r['seconds']:.0f} |"
        )
    write_machine_results(
        "tool-calls",
        int(os.environ.get("SQFT_INFERENCE_THREADS", 2)),
        {
            "model": gguf.name,
            "train_records": len(train),
            "heldout_per_kind": args.heldout,
            "train_seconds": round(train_s, 1),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
