"""Calibration a sample at a time against batched (``adapters/calibration.py``): ``python -m bench.calibration_speed``.

On SmolLM2-135M-Instruct (de-quantized from its GGUF) and ``--samples`` ARC-E training records, each
alternately with one sample per calibration forward and with ``CALIBRATION_BATCH_TOKENS`` per forward
(right-padded), ``--repeats`` times, turn by turn:

* Wanda pruning to 50% (``sparsify_model``): a forward of the whole model, input norms of every linear;
* GPTQ (``adapters/qa/gptq.py``, 4 bits, groups of 64) of the first ``--layers`` decoder layers of the
  model pruned to 50% by magnitude.

Reports each one's seconds (and the median) and how far the two results are apart: the weights Wanda
pruned differently, the weights GPTQ put on another code (a float rounding in a batched GEMM can tip a
weight on a boundary) and GPTQ's mean output error each way. Figures go to
``bench/results/<date>-calibration-speed-<host>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from sqft_service.adapters.calibration import CALIBRATION_BATCH_TOKENS
from sqft_service.adapters.qa.gptq import gptq_quantize_
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
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pruned = copy.deepcopy(dense)
    sparsify_model(pruned, "magnitude", 0.5)
    records = json.loads(Path("../shared/data/arce_train_instruct.json").read_text())[: args.samples]
    texts = [f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}" for r in records]
    samples = [torch.tensor([tokenizer(t, truncation=True, max_length=args.max_tokens)["input_ids"]]) for t in texts]
    prefixes = tuple(f"model.layers.{i}." for i in range(args.layers))

    def gptq(batch_tokens: int) -> tuple[torch.nn.Module, dict]:
        model = copy.deepcopy(pruned)
        linears = {n: m for n, m in prunable_linears(model).items() if n.startswith(prefixes)}
        return model, gptq_quantize_(model, linears, samples, 4, 64, batch_tokens=batch_tokens)

    def wanda(batch_tokens: int) -> tuple[torch.nn.Module, dict]:
        model = copy.deepcopy(dense)
        return model, sparsify_model(model, "wanda", 0.5, calibration_input_ids=samples, batch_tokens=batch_tokens)

    setups = {"one_sample_per_forward": 1, "batched": CALIBRATION_BATCH_TOKENS}
    figures = {
        "model": "SmolLM2-135M-Instruct",
        "samples": len(samples),
        "tokens": sum(s.numel() for s in samples),
        "batch_tokens": CALIBRATION_BATCH_TOKENS,
    }
    for task, run in (("wanda", wanda), ("gptq", gptq)):
        seconds: dict[str, list[float]] = {name: [] for name in setups}
        last: dict[str, tuple[torch.nn.Module, dict]] = {}
        for _ in range(args.repeats):
            for name, batch_tokens in setups.items():
                started = time.perf_counter()
                last[name] = run(batch_tokens)
                seconds[name].append(time.perf_counter() - started)
                print(f"{task} {name}: {seconds[name][-1]:.1f} s", flush=True)
        (one, one_report), (batched, batched_report) = last["one_sample_per_forward"], last["batched"]
        other = dict(batched.named_parameters())
        scope = () if task == "wanda" else prefixes  # Wanda prunes every layer; GPTQ quantized the first few
        weights = {n: p for n, p in one.named_parameters() if n.startswith(scope or "") and n.endswith("proj.weight")}
        figures[task] = {
            **({"layers": args.layers, "bits": 4, "group_size": 64} if task == "gptq" else {"sparsity": 0.5}),
            "seconds": {name: [round(s, 2) for s in runs] for name, runs in seconds.items()},
            "median_s": {name: round(statistics.median(runs), 2) for name, runs in seconds.items()},
            "speedup": round(
                statistics.median(seconds["one_sample_per_forward"]) / statistics.median(seconds["batched"]), 2
            ),
            "weights": sum(w.numel() for w in weights.values()),
            # Wanda: kept or pruned differently; GPTQ: another code.
            "weights_that_differ": sum(
                int(((w == 0) != (other[n] == 0)).sum() if task == "wanda" else (w != other[n]).sum())
                for n, w in weights.items()
            ),
        }
        if task == "gptq":
            figures[task]["output_error"] = {
                name: sum(r.error for r in report.values()) / len(report)
                for name, report in (("one_sample_per_forward", one_report), ("batched", batched_report))
            }
    print(json.dumps(figures, indent=1))
    print(f"saved {write_machine_results('calibration-speed', torch.get_num_threads(), figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
