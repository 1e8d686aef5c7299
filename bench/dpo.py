"""Preference fine-tuning (DPO) against supervised fine-tuning on the same replies: ``python -m bench.dpo``.

ARC-Easy questions become preference pairs: the preferred reply is the question's answer, the other
the answer of another question (a seeded derangement), both after the question as a user turn. On
held-out pairs each model is scored by the share of pairs whose preferred reply it finds likelier
(``preference accuracy``), the mean log-probability margin, and the loss of the preferred replies.
The base, an SFT fine-tune on the preferred replies (the service's auto hyperparameters) and DPO
fine-tunes at several learning rates (β 0.1, the rest auto) run with the service's own recipe, one
after another on this machine; their step times, and DPO's one reference pass, are reported too.
Figures go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sqft_service.auto_hparams import apply
from sqft_service.config import SIMPO_BETA, FinetuneConfig
from sqft_service.training.batching import Collator
from sqft_service.training.events import MemorySink
from sqft_service.training.preference import PairCollator, sequence_logps, tokenize_pairs
from sqft_service.training.recipe import FinetuneRecipe

from .throughput.inputs import CACHE, find_data, prepare_models
from .throughput.report import write_machine_results


def pairs_from_arc(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    records = json.loads(find_data("arce_train_instruct.json").read_text())
    random.Random(0).shuffle(records)
    records = records[: n_val + n_train]
    others = list(range(len(records)))
    random.Random(1).shuffle(others)
    # A derangement: shift the shuffled order by one, so no question is paired with its own answer.
    other_of = {others[i]: others[(i + 1) % len(others)] for i in range(len(others))}
    pairs = []
    for i, r in enumerate(records):
        other = records[other_of[i]]["output"]
        if other.strip() == r["output"].strip():
            continue
        pairs.append(
            {
                "input": {"messages": [{"role": "user", "content": r["instruction"]}]},
                "preferred_output": [{"role": "assistant", "content": r["output"]}],
                "non_preferred_output": [{"role": "assistant", "content": other}],
            }
        )
    return pairs[n_val:], pairs[:n_val]


def as_chat(pairs: list[dict]) -> list[dict]:
    return [{"messages": [*p["input"]["messages"], p["preferred_output"][0]]} for p in pairs]


def score(recipe: FinetuneRecipe, val_pairs: list[dict]) -> dict[str, float]:
    """Held-out preference accuracy and mean margin of the recipe's model as it stands."""
    pairs, _ = tokenize_pairs(val_pairs, recipe.tokenizer, recipe.cfg.Dataset)
    collator = PairCollator(Collator.from_config(recipe.tokenizer, recipe.cfg.Dataset, pad_to_multiple_of=None))
    recipe.model.eval()
    if recipe.handles.nls is not None:
        recipe.handles.nls.activate_maximal()
    wins, margin = 0, 0.0
    with torch.no_grad(), recipe._autocast():
        for first in range(0, len(pairs), 16):
            logps = sequence_logps(recipe.model, collator(pairs[first : first + 16]))
            margins = logps[:, 0] - logps[:, 1]
            wins += int((margins > 0).sum())
            margin += float(margins.sum())
    recipe.model.train()
    return {"preference_accuracy": round(wins / len(pairs), 4), "preference_margin": round(margin / len(pairs), 3)}


def run(name: str, cfg: FinetuneConfig, val_pairs: list[dict], out: Path, *, base: bool = False) -> dict[str, Any]:
    sink = MemorySink(echo=False)
    recipe = FinetuneRecipe(cfg, out, sink, model_cache_dir=CACHE / "models")
    recipe.setup()
    row: dict[str, Any] = {"setup": name}
    if base:
        return {**row, "setup": "base", **score(recipe, val_pairs)}
    t0 = time.perf_counter()
    recipe.train()
    row["train_s"] = round(time.perf_counter() - t0, 1)
    steps = [m for m in sink.metric_rows if "step_s" in m]
    row["step_s"] = round(sum(m["step_s"] for m in steps[1:]) / max(len(steps) - 1, 1), 3)
    row["tokens_per_s"] = steps[-1]["tokens_per_s"] if steps else None
    reference = [t for _, t, _ in sink.messages if t.startswith("DPO reference")]
    row["reference_pass"] = reference[0] if reference else None
    t = cfg.Training
    row["hyperparameters"] = {
        "method": t.method,
        "beta": t.dpo_beta if t.method == "dpo" else None,
        "loss": t.dpo_loss if t.method == "dpo" else None,
        "learning_rate": t.learning_rate,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "steps": steps[-1]["step"] if steps else 0,
    }
    valid = [m for m in sink.metric_rows if "valid_loss" in m]
    if t.method == "dpo" and valid:
        row["valid_dpo_loss"], row["valid_reward_accuracy"] = (
            valid[-1]["valid_loss"],
            valid[-1]["valid_mean_token_accuracy"],
        )
    row |= score(recipe, val_pairs)
    recipe.cleanup()
    return row


def config(
    model: str,
    train: Path,
    val: Path,
    n_train: int,
    method: str,
    lr: float | None,
    loss: str = "sigmoid",
    beta: float | None = None,
) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = model
    cfg.Dataset.train_file, cfg.Dataset.validation_file = str(train), str(val)
    cfg.Training.method = method
    cfg.Training.seed = 42
    cfg.Training.logging_steps = 1
    explicit = {"Training.method", "Training.seed", "Training.logging_steps"}
    if method == "dpo":
        cfg.Training.dpo_loss = loss  # type: ignore[assignment]
        explicit.add("Training.dpo_loss")
        if beta is None and loss == "simpo":  # as a job gets it (config.TrainingSection)
            beta = SIMPO_BETA
        if beta is not None:
            cfg.Training.dpo_beta = beta
            explicit.add("Training.dpo_beta")
    if lr is not None:
        cfg.Training.learning_rate = lr
        explicit.add("Training.learning_rate")
    return FinetuneConfig.model_validate(apply(cfg, n_train, explicit=explicit).model_dump())


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| setup | lr | steps | s/step | held-out preference accuracy | mean margin (nats) | held-out DPO loss |\n"
    head += "|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        hp = r.get("hyperparameters", {})
        lines.append(
            f"| {r['setup']} | {hp.get('learning_rate', '')} | {hp.get('steps', '')} | {r.get('step_s', '')} | "
            f"{r['preference_accuracy']:.3f} | {r['preference_margin']:.2f} | {r.get('valid_dpo_loss', '')} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400, help="training pairs")
    parser.add_argument("--val", type=int, default=200, help="held-out pairs")
    parser.add_argument("--lrs", default="5e-5,2e-4,5e-4", help="DPO learning rates, comma-separated")
    parser.add_argument("--losses", default="sigmoid", help="preference losses (Training.dpo_loss), comma-separated")
    parser.add_argument("--no-sft", action="store_true", help="skip the base and SFT rows")
    parser.add_argument("--beta", type=float, default=None, help="Training.dpo_beta (default: auto, 0.1)")
    args = parser.parse_args(argv)

    model_dir, _ = prepare_models(None)
    train_pairs, val_pairs = pairs_from_arc(args.train, args.val)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {}
        for kind, records in (("pref", train_pairs), ("pref_val", val_pairs)):
            files[kind] = work / f"{kind}.json"
            files[kind].write_text(json.dumps(records))
        for kind, records in (("sft", as_chat(train_pairs)), ("sft_val", as_chat(val_pairs))):
            files[kind] = work / f"{kind}.json"
            files[kind].write_text(json.dumps(records))
        n = len(train_pairs)
        sft = config(model_dir, files["sft"], files["sft_val"], n, "supervised", None)
        if not args.no_sft:
            rows.append(run("base", sft, val_pairs, work / "base", base=True))
            rows.append(run("SFT on the preferred replies", sft, val_pairs, work / "sft"))
            print(json.dumps(rows[-1]), flush=True)
        names = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC (hinge)", "robust": "robust DPO", "simpo": "SimPO"}
        for loss in args.losses.split(","):
            for lr in [float(x) for x in args.lrs.split(",")]:
                cfg = config(model_dir, files["pref"], files["pref_val"], n, "dpo", lr, loss, args.beta)
                name = f"{names[loss]} (beta {cfg.Training.dpo_beta})"
                rows.append(run(name, cfg, val_pairs, work / f"{loss}-{lr}"))
                print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    figures = {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "rows": rows, "markdown": table}
    named = "" if args.losses == "sigmoid" else "-" + args.losses.replace(",", "-")
    write_machine_results(f"dpo{named}", torch.get_num_threads(), figures)


if __name__ == "__main__":
    main()
