"""Compare what you trained through OpenAI's Evals API: SmolLM2-135M-Instruct fine-tuned on ARC-Easy
(Alpaca records), then one eval, run once on the base and once on the fine-tuned model, on held-out
questions, every request through the service's own routes (``/v1/evals``, its runs and output items).

The eval's rows are ``{"question", "answer"}``; each run samples its model greedily on the question
(``completions`` data source, a template of one user message) and grades the answer three ways:
``string_check`` ``ilike`` (the reference inside the answer, any case), ``text_similarity`` ``rouge_l``
≥ 0.5 and ``fuzzy_match`` ≥ 0.8. A row passes when all three pass. Also a ``jsonl`` run that grades
the fine-tuned run's own answers (taken from its output items) without a model: the same scores, the
grading alone timed. Writes ``bench/results/<date>-evals-<host>.json``. From the repository root:
``.venv/bin/python -m bench.evals [--train 400] [--heldout 100] [--epochs 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench.load.server import ServerProcess
from bench.throughput.inputs import find_data
from bench.throughput.report import write_machine_results

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
PER_GRADER = "per_testing_criteria_results"
QUESTION = [{"role": "user", "content": "{{ item.question }}"}]
ANSWER, REFERENCE = "{{ sample.output_text }}", "{{ item.answer }}"
GRADERS = [
    {"type": "string_check", "name": "contains", "input": ANSWER, "reference": REFERENCE, "operation": "ilike"},
    {
        "type": "text_similarity",
        "name": "rouge_l",
        "input": ANSWER,
        "reference": REFERENCE,
        "evaluation_metric": "rouge_l",
        "pass_threshold": 0.5,
    },
    {
        "type": "text_similarity",
        "name": "fuzzy",
        "input": ANSWER,
        "reference": REFERENCE,
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": 0.8,
    },
]


def _post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    if response.status_code != 200:
        raise SystemExit(f"POST {path}: {response.status_code} {response.text}")
    return response.json()


def _upload(url: str, path: Path, purpose: str) -> str:
    with path.open("rb") as handle:
        response = httpx.post(f"{url}/v1/files", files={"file": handle}, data={"purpose": purpose}, timeout=60)
    response.raise_for_status()
    return response.json()["id"]


def _wait(url: str, path: str, done: tuple[str, ...]) -> dict:
    while (got := httpx.get(f"{url}{path}", timeout=30).json())["status"] not in done:
        time.sleep(1)
    return got


def _items(url: str, eval_id: str, run_id: str) -> list[dict]:
    items, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(f"{url}/v1/evals/{eval_id}/runs/{run_id}/output_items", params=params, timeout=60).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def _run(url: str, eval_id: str, name: str, data_source: dict) -> tuple[dict, float, list[dict]]:
    t0 = time.monotonic()
    run = _post(url, f"/v1/evals/{eval_id}/runs", {"name": name, "data_source": data_source})
    done = _wait(url, f"/v1/evals/{eval_id}/runs/{run['id']}", ("completed", "failed", "canceled"))
    seconds = time.monotonic() - t0
    if done["status"] != "completed":
        raise SystemExit(f"run {name} ended {done['status']}: {done.get('error')}")
    return done, seconds, _items(url, eval_id, run["id"])


def _row(done: dict, seconds: float) -> dict[str, Any]:
    counts = done["result_counts"]
    per = {
        r["testing_criteria"]: r["passed"] / max(1, r["passed"] + r["failed"])
        for r in done["per_testing_criteria_results"]
    }
    return {
        "passed": counts["passed"] / counts["total"],
        "errored": counts["errored"],
        **{name: round(share, 3) for name, share in per.items()},
        "seconds": round(seconds, 1),
        "rows_per_s": round(counts["total"] / seconds, 2),
        "usage": done["per_model_usage"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400, help="ARC-Easy records to fine-tune on")
    parser.add_argument("--heldout", type=int, default=100, help="held-out ARC-Easy questions to evaluate on")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    from sqft_service.model_access import smollm2_dir

    arc_path = find_data("arce_train_instruct.json")
    if arc_path is None:
        raise SystemExit("../shared/data/arce_train_instruct.json is missing")
    records = json.loads(arc_path.read_text())
    assert args.train + args.heldout <= len(records), "training and held-out records would overlap"
    train, held = records[: args.train], records[-args.heldout :]
    gguf = next(smollm2_dir().glob("*.gguf"))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sqft-evals-") as tmp:
        root = Path(tmp)
        server = ServerProcess(root / "data", env={}, log_path=root / "server.log")
        server.start()
        try:
            url = server.url
            (root / "train.json").write_text(json.dumps(train))
            body = {
                "model": str(gguf),
                "training_file": _upload(url, root / "train.json", "fine-tune"),
                "suffix": "arce",
                "Training": {"epochs": args.epochs, "batch_size": 8, "learning_rate": 3e-4},
            }
            t0 = time.monotonic()
            job = _post(url, "/v1/fine_tuning/jobs", body)
            job = _wait(url, f"/v1/fine_tuning/jobs/{job['id']}", ("succeeded", "failed", "cancelled"))
            train_s = time.monotonic() - t0
            if job["status"] != "succeeded":
                raise SystemExit(f"the fine-tuning job ended {job['status']}: {job.get('error')}")
            content = [{"item": {"question": r["instruction"], "answer": r["output"]}} for r in held]
            (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in content))
            rows_file = _upload(url, root / "rows.jsonl", "evals")
            config = {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}
            ev = _post(url, "/v1/evals", {"name": "arce", "data_source_config": config, "testing_criteria": GRADERS})
            tuned_items: list[dict] = []
            for name, model in (("base", str(gguf)), ("fine-tuned", job["fine_tuned_model"])):
                source = {
                    "type": "completions",
                    "model": model,
                    "input_messages": {
                        "type": "template",
                        "template": [{"role": "user", "content": "{{ item.question }}"}],
                    },
                    "sampling_params": {"temperature": 0, "max_completion_tokens": args.max_tokens},
                    "source": {"type": "file_id", "id": rows_file},
                }
                done, seconds, items = _run(url, ev["id"], name, source)
                rows[name] = _row(done, seconds)
                tuned_items = items
            given = [
                {"item": i["datasource_item"], "sample": {"output_text": i["sample"]["output"][0]["content"] or ""}}
                for i in sorted(tuned_items, key=lambda i: i["datasource_item_id"])
            ]
            jsonl = {"type": "jsonl", "source": {"type": "file_content", "content": given}}
            done, seconds, _ = _run(url, ev["id"], "fine-tuned, graded again (jsonl)", jsonl)
            rows["fine-tuned answers, jsonl (grading only)"] = _row(done, seconds)
        finally:
            server.stop()
    tuned = job["fine_tuned_model"]
    print(f"fine-tuned {tuned} on {len(train)} ARC-E records, {args.epochs} epoch(s), in {train_s:.0f} s")
    print("| run | passed (all 3) | contains | rouge_l ≥ 0.5 | fuzzy ≥ 0.8 | errored | s | rows/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['passed']:.2f} | {r['contains']:.2f} | {r['rouge_l']:.2f} | {r['fuzzy']:.2f} "
            f"| {r['errored']} | {r['seconds']:.0f} | {r['rows_per_s']:.1f} |"
        )
    write_machine_results(
        "evals",
        int(os.environ.get("SQFT_INFERENCE_THREADS", 2)),
        {
            "model": gguf.name,
            "train_records": len(train),
            "epochs": args.epochs,
            "heldout": len(held),
            "max_completion_tokens": args.max_tokens,
            "train_s": round(train_s, 1),
            "graders": GRADERS,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
