"""QA-SparsePEFT against SparsePEFT + post-training quantization: ``python -m bench.qa_sparse``.

SmolLM2-135M-Instruct pruned to 50% (magnitude, the cached copy of ``bench.throughput``) is fine-tuned
on an ARC-E subset with the service's own recipe, twice with the same seed, data and hyperparameters:

* ``sparse``: SparsePEFT in float32, then merged and quantized to INT``bits`` by round-to-nearest
  (group-wise min/max fitted on the merged weight): the usual "train, then quantize" route;
* ``qa``: QA-SparsePEFT, trained through the quantizer of the base, whose merge is the INT model;
* ``qa_gptq``: the same on a GPTQ base (the same pruning, then ``sparsify``'s ``quantization``, GPTQ
  calibrated on ``--calibration`` training records): SQFT's own pipeline.

It reports the held-out loss (response tokens) of: the pruned base in float32 and quantized; each
fine-tune's float forward; the sparse one after PTQ; the QA model merged (which must equal its
training forward), plus each fine-tune's seconds per step. Figures go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sqft_service.adapters.qa import GroupQuantizer
from sqft_service.adapters.sparse import SparseLoraLinear
from sqft_service.config import FinetuneConfig
from sqft_service.model_ops import sparsify

from .auto_hparams import prepare_data
from .throughput.inputs import CACHE, TARGETS, prepare_models
from .throughput.report import write_machine_results


def config(model: str, train: Path, val: Path, args: argparse.Namespace, qa: bool) -> FinetuneConfig:
    lora: dict[str, Any] = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "sparse_adapter": True,
    }
    if qa:
        lora |= {"quantization_aware": True, "quantization_bits": args.bits, "quantization_group_size": args.group}
    return FinetuneConfig.model_validate(
        {
            "General": {"base_model": model, "lora_config": lora},
            "Dataset": {"train_file": str(train), "validation_file": str(val)},
            "Training": {
                "batch_size": 8,
                "epochs": 1,
                "learning_rate": args.lr,
                "warmup_steps": 3,
                "mixed_precision": "no",  # float32: the comparison is about quantization alone
                "seed": 42,
                "logging_steps": 1000,
            },
        }
    )


def quantize_merged_(recipe: Any, bits: int, group: int) -> None:
    """Merge each SparsePEFT layer and round its weight to INT``bits`` (RTN on the merged weight)."""
    for module in recipe.model.modules():
        if isinstance(module, SparseLoraLinear):
            module.merge()
            weight = module.get_base_layer().weight
            with torch.no_grad():
                weight.copy_(GroupQuantizer.fit(weight, bits, group).fake_quantize(weight))


def run(name: str, cfg: FinetuneConfig, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from sqft_service.training.events import MemorySink
    from sqft_service.training.recipe import FinetuneRecipe

    recipe = FinetuneRecipe(cfg, work / name, MemorySink(echo=False), model_cache_dir=CACHE / "models")
    recipe.setup()
    row: dict[str, Any] = {"setup_start_valid_loss": recipe.evaluate()["valid_loss"]}
    t0 = time.perf_counter()
    result = recipe.train()
    row["s_per_step"] = round((time.perf_counter() - t0) / result.steps, 3)  # includes the final evaluation
    row["steps"] = result.steps
    row["valid_loss"] = recipe.evaluate()["valid_loss"]
    if name == "sparse":
        quantize_merged_(recipe, args.bits, args.group)
        row["ptq_valid_loss"] = recipe.evaluate()["valid_loss"]
    else:
        recipe.model.merge_and_unload()  # the INT model (adapters/qa): the same figure, to the bit
        row["merged_valid_loss"] = recipe.evaluate()["valid_loss"]
    print(name, row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.qa_sparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--calibration", type=int, default=128, help="GPTQ calibration records (training file)")
    parser.add_argument("--runs", default="sparse,qa,qa_gptq", help="comma-separated: sparse, qa, qa_gptq")
    args = parser.parse_args(argv)
    model_dir, sparse_dir = prepare_models(None)
    work = Path(tempfile.mkdtemp(prefix="sqft-qa-bench-"))
    # The auto-hparams benchmark's split (shuffle seed 0, validation first); its GSM8K part unused.
    train, val = prepare_data(work, {"arc_e": args.train, "gsm8k": 0}, {"arc_e": args.val, "gsm8k": 0})["arc_e"]
    names = args.runs.split(",")
    bases = {"sparse": sparse_dir, "qa": sparse_dir}
    gptq_report = None
    if "qa_gptq" in names:
        t0 = time.perf_counter()
        gptq_report = sparsify(
            model_dir,
            work / "gptq-base",
            method="magnitude",
            sparsity=0.5,
            calibration_file=str(train),
            n_calibration=args.calibration,
            quantization={"method": "gptq", "bits": args.bits, "group_size": args.group},
        )
        gptq_report = {"seconds": round(time.perf_counter() - t0, 1), **gptq_report["quantization"]}
        print("gptq", gptq_report, flush=True)
        bases["qa_gptq"] = gptq_report["path"] = str(work / "gptq-base")
    rows = {name: run(name, config(bases[name], train, val, args, qa=name != "sparse"), work, args) for name in names}
    figures = {
        "model": "SmolLM2-135M-Instruct, 50% magnitude-sparse",
        "data": {"arc_e_train": args.train, "arc_e_valid": args.val, "shuffle_seed": 0},
        "settings": {"bits": args.bits, "group_size": args.group, "lr": args.lr, "batch_size": 8, "r": 16},
        "rows": rows,
        **({"gptq": gptq_report} if gptq_report else {}),
    }
    if {"qa", "sparse"} <= set(rows):
        figures["qa_step_over_sparse_step"] = round(rows["qa"]["s_per_step"] / rows["sparse"]["s_per_step"], 3)
    write_machine_results("qa-sparse", torch.get_num_threads(), figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
