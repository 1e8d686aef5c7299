"""What each part of a reinforcement job's sampling costs: ``python -m bench.rft_sampling``.

A step of ``bench/rft.py`` samples 4 answers to each of 8 ARC-E prompts (up to 48 tokens, temperature
1) from SmolLM2 under the job's LoRA, in the job's precision. This bench builds that job's model once
and times the sampling five ways, turn by turn, each adding one change to ``generate()`` as a
reinforcement step called it before (``training/sampling.py`` and ``training/attention.py`` say why):

1. stock: transformers' eager attention, every row its own prompt, ``torch.multinomial``;
2. + the tied lm_head cast to bf16 once for the sampling, not at every token;
3. + eager attention without ``repeat_kv``'s copies;
4. + each prompt's cache computed once and repeated for its group;
5. + tokens drawn by the inverse CDF: the service's ``sample_answers``.

Every answer runs to ``--max-tokens`` (no end token), so each way does the same work. Figures go to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from sqft_service.inference.greedy import left_padded
from sqft_service.inference.prompt_cache import prompt_cache
from sqft_service.training.attention import GROUPED_EAGER
from sqft_service.training.events import MemorySink
from sqft_service.training.loss import causal_lm_of
from sqft_service.training.precision import head_cast_once
from sqft_service.training.rl_recipe import ReinforcementRecipe
from sqft_service.training.sampling import sample_answers

from .rft import config, prompts_from_arc
from .throughput.inputs import CACHE, prepare_models
from .throughput.report import write_machine_results

NO_END = [10**9]  # an id no vocabulary has: every row decodes max_tokens


def stock_generate(model: Any, prompts: list[list[int]], group: int, max_tokens: int, pad: int, shared: bool) -> None:
    """``generate()`` sampling with ``torch.multinomial``; ``shared``: from each prompt's cache, repeated."""
    input_ids, mask = left_padded(prompts, pad)
    cache = prompt_cache(model, input_ids, mask, group) if shared else None
    model.generate(
        input_ids=input_ids.repeat_interleave(group, 0),
        attention_mask=mask.repeat_interleave(group, 0),
        past_key_values=cache,
        max_new_tokens=max_tokens,
        pad_token_id=pad,
        eos_token_id=NO_END,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per sampling (a step's batch)")
    parser.add_argument("--group", type=int, default=4, help="answers per prompt")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="turns of every way")
    args = parser.parse_args(argv)

    model_dir, _ = prepare_models(None)
    train, val = prompts_from_arc(args.prompts, 4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind, records in (("train", train), ("val", val)):
            (work / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rft_args = argparse.Namespace(
            group=args.group, max_tokens=args.max_tokens, batch=args.prompts, grader="fuzzy_match"
        )
        cfg = config(model_dir, work / "train.jsonl", work / "val.jsonl", len(train), 5e-4, rft_args)
        recipe = ReinforcementRecipe(cfg, work / "out", MemorySink(echo=False), model_cache_dir=CACHE / "models")
        recipe.setup()
        model, lm, dtype = recipe.model, causal_lm_of(recipe.model), recipe.autocast_dtype
        prompts = [p.ids for p in recipe.train_examples[: args.prompts]]
        pad, group, n = recipe.collator.pad_token_id, args.group, args.max_tokens

        def head() -> Any:
            return head_cast_once(lm, dtype)

        ways: dict[str, tuple[str, Any, Any]] = {  # name: (attention, context, sampling)
            "stock generate()": (
                "eager",
                contextlib.nullcontext,
                lambda: stock_generate(model, prompts, group, n, pad, False),
            ),
            "+ head cast once": ("eager", head, lambda: stock_generate(model, prompts, group, n, pad, False)),
            "+ no repeat_kv": (GROUPED_EAGER, head, lambda: stock_generate(model, prompts, group, n, pad, False)),
            "+ prompt cache shared": (GROUPED_EAGER, head, lambda: stock_generate(model, prompts, group, n, pad, True)),
            "+ inverse CDF (ours)": (
                GROUPED_EAGER,
                head,
                lambda: sample_answers(
                    model, prompts, group, max_tokens=n, temperature=1.0, pad_id=pad, eos_ids=NO_END
                ),
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        model.eval()
        with torch.no_grad(), recipe._autocast():
            for turn in range(args.rounds + 1):  # turn 0 warms up
                for name, (attention, context, run) in ways.items():
                    lm.set_attn_implementation(attention)
                    torch.manual_seed(turn)
                    with context():
                        start = time.perf_counter()
                        run()
                        elapsed = time.perf_counter() - start
                    if turn:
                        times[name].append(round(elapsed, 3))
                    print(f"turn {turn} {name}: {elapsed:.2f} s", flush=True)
        recipe.cleanup()

    stock = median(times["stock generate()"])
    rows = [
        {"way": name, "seconds": t, "median_s": median(t), "speedup": round(stock / median(t), 2)}
        for name, t in times.items()
    ]
    tokens = args.prompts * group * n
    table = "| way | median s per sampling | answer tokens/s | vs stock |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['way']} | {r['median_s']:.2f} | {tokens / r['median_s']:.0f} | {r['speedup']:.2f}x |" for r in rows
    )
    print(table)
    figures = {
        "prompts": args.prompts,
        "group": group,
        "max_tokens": n,
        "rounds": args.rounds,
        "rows": rows,
        "markdown": table,
    }
    write_machine_results("rft-sampling", torch.get_num_threads(), figures)


if __name__ == "__main__":
    main()
