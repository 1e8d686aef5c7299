"""GPTQ's calibration, a sample at a time against batched: ``python -m bench.gptq_speed``.

SmolLM2-135M-Instruct (de-quantized from its GGUF), pruned to 50% by magnitude, then its first
``--layers`` decoder layers quantized by GPTQ (``adapters/qa/gptq.py``, 4 bits, groups of 64) on
``--samples`` ARC-E training records, alternately with one sample per calibration forward and with
``CALIBRATION_BATCH_TOKENS`` per forward (right-padded), ``--repeats`` times each, turn by turn. Reports
the seconds of each (the median) and how far the two quantized models are apart: the weights that took
another code (a float rounding in a batched GEMM may tip a weight on a code boundary) and the mean output
error of each. Figures go to ``bench/results/<date>-gptq-speed-<host>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from sqft_service.adapters.qa.gptq import CALIBRATION_BATCH_TOKENS, gptq_quantize_
from sqft_service.adapters.sparsify import prunable_linears, sparsify_model
from sqft_service.training.models import convert_gguf

from .throughput.inputs import CACHE, default_model
from .throughput.report import write_machine_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per calibration sample at most")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = convert_gguf(default_model(), CACHE / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pruned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sparsify_model(pruned, "magnitude", 0.5)
    records = json.loads(Path("../shared/data/arce_train_instruct.json").read_text())[: args.samples]
    texts = [f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}" for r in records]
    samples = [torch.tensor([tokenizer(t, truncation=True, max_length=args.max_tokens)["input_ids"]]) for t in texts]
    prefixes = tuple(f"model.layers.{i}." for i in range(args.layers))

    def run(batch_tokens: int) -> tuple[float, torch.nn.Module, dict]:
        model = copy.deepcopy(pruned)
        linears = {n: m for n, m in prunable_linears(model).items() if n.startswith(prefixes)}
        started = time.perf_counter()
        with torch.inference_mode():
            results = gptq_quantize_(model, linears, samples, 4, 64, batch_tokens=batch_tokens)
        return time.perf_counter() - started, model, results

    setups = {"one_sample_per_forward": 1, "batched": CALIBRATION_BATCH_TOKENS}
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    last: dict[str, tuple[torch.nn.Module, dict]] = {}
    for _ in range(args.repeats):
        for name, batch_tokens in setups.items():
            elapsed, model, results = run(batch_tokens)
            seconds[name].append(elapsed)
            last[name] = (model, results)
            print(f"{name}: {elapsed:.1f} s", flush=True)
    (one, one_results), (batched, batched_results) = last["one_sample_per_forward"], last["batched"]
    weights = {n: p for n, p in one.named_parameters() if n.startswith(prefixes) and n.endswith("proj.weight")}
    other = dict(batched.named_parameters())
    moved = sum(int((w != other[n]).sum()) for n, w in weights.items())
    total = sum(w.numel() for w in weights.values())
    figures = {
        "model": "SmolLM2-135M-Instruct, magnitude 50%",
        "layers": args.layers,
        "samples": len(samples),
        "tokens": sum(s.numel() for s in samples),
        "bits": 4,
        "group_size": 64,
        "batch_tokens": CALIBRATION_BATCH_TOKENS,
        "seconds": {name: [round(s, 2) for s in runs] for name, runs in seconds.items()},
        "median_s": {name: round(statistics.median(runs), 2) for name, runs in seconds.items()},
        "speedup": round(
            statistics.median(seconds["one_sample_per_forward"]) / statistics.median(seconds["batched"]), 2
        ),
        "weights_with_another_code": moved,
        "weights": total,
        "output_error": {
            "one_sample_per_forward": sum(r.error for r in one_results.values()) / len(one_results),
            "batched": sum(r.error for r in batched_results.values()) / len(batched_results),
        },
    }
    print(json.dumps(figures, indent=1))
    print(f"saved {write_machine_results('gptq-speed', torch.get_num_threads(), figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
