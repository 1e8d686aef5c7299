"""Reinforcement fine-tuning (GRPO with a grader) on SmolLM2: ``python -m bench.rft``.

ARC-Easy questions become prompt records (the question as a user turn, the answer as ``item.answer``);
the job's grader (``--grader``) is a ``text_similarity`` ``fuzzy_match`` (default) or ``rouge_l`` of the
sampled answer against that answer, or a ``string_check`` ``ilike`` (the answer contains it). Nothing is
trained on the answers themselves: the model only learns from the scores of its own samples. Before and
after training the held-out prompts are answered greedily and graded by all three. The recipe is the
service's own; one learning rate per row, one after another on this machine. Figures go to
``bench/results/``.
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
from sqft_service.config import FinetuneConfig
from sqft_service.graders import grade, sample_namespace
from sqft_service.training.events import MemorySink
from sqft_service.training.rl_recipe import ReinforcementRecipe

from .throughput.inputs import CACHE, find_data, prepare_models
from .throughput.report import write_machine_results

GRADER = {
    "type": "text_similarity",
    "name": "close to the answer",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.5,
}
UNSEEN = {
    "rouge_l": {**GRADER, "name": "rouge_l", "evaluation_metric": "rouge_l"},
    "contains_answer": {
        "type": "string_check",
        "name": "contains",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "ilike",
    },
}


def prompts_from_arc(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    records = json.loads(find_data("arce_train_instruct.json").read_text())
    random.Random(0).shuffle(records)
    prompts = [
        {"messages": [{"role": "user", "content": r["instruction"]}], "answer": r["output"]}
        for r in records[: n_val + n_train]
    ]
    return prompts[n_val:], prompts[:n_val]


GRADERS = {"fuzzy_match": GRADER, **UNSEEN}
# The trained-on grader's score and "contains the answer" together: a short answer that is close to the
# reference scores less than one that holds it (fuzzy_match alone rewards brevity).
MULTI = {
    "type": "multi",
    "name": "contains + fuzzy_match",
    "graders": {"contains": UNSEEN["contains_answer"], "close": GRADER},
    "calculate_output": "0.5 * contains + 0.5 * close",
}
# Setups compared row by row (`--setups`): Training settings on top of the `--grader` job.
SETUPS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "kl": {"rl_kl_beta": 0.04},  # DeepSeekMath's beta
    "mu2": {"rl_updates_per_sample": 2},  # two updates per sampling, PPO's clip 0.2
    "multi": {"rl_grader": MULTI},
}


def held_out(recipe: ReinforcementRecipe) -> dict[str, Any]:
    """Greedy answers to the validation prompts, graded by every grader (the job trained on one of them)."""
    prompts = recipe.eval_examples
    answers: list[list[int]] = []
    for first in range(0, len(prompts), 16):
        answers += recipe._sample(prompts[first : first + 16], 1, None, 0)
    texts = recipe._texts(answers)
    out: dict[str, Any] = {}
    for name, grader in GRADERS.items():
        scores = [grade(grader, p.item, sample_namespace(t, None)) for p, t in zip(prompts, texts, strict=True)]
        out[name] = round(sum(s for s, _ in scores) / len(scores), 4)
        out[f"{name} passed"] = round(sum(ok for _, ok in scores) / len(scores), 4)
    out["answer_tokens"] = round(sum(len(a) for a in answers) / len(answers), 1)
    out["examples"] = [
        {"answer": t, "reference": p.item["answer"]} for p, t in list(zip(prompts, texts, strict=True))[:3]
    ]
    return out


def config(
    model: str, train: Path, val: Path, n_train: int, lr: float, args: argparse.Namespace, setup: str = "grpo"
) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = model
    cfg.Dataset.train_file, cfg.Dataset.validation_file = str(train), str(val)
    t = cfg.Training
    t.method, t.rl_grader, t.seed, t.logging_steps = "reinforcement", GRADERS[args.grader], 42, 1
    t.rl_group_size, t.rl_max_tokens, t.learning_rate, t.epochs = args.group, args.max_tokens, lr, 1
    t.batch_size = args.batch
    for key, value in SETUPS[setup].items():
        setattr(t, key, value)
    explicit = {f"Training.{k}" for k in t.model_fields_set}
    return FinetuneConfig.model_validate(apply(cfg, n_train, explicit=explicit).model_dump())


def run(cfg: FinetuneConfig, out: Path, *, base: bool) -> dict[str, Any]:
    sink = MemorySink(echo=False)
    recipe = ReinforcementRecipe(cfg, out, sink, model_cache_dir=CACHE / "models")
    recipe.setup()
    if base:
        return {"setup": "base", **held_out(recipe)}
    t0 = time.perf_counter()
    recipe.train()
    t = cfg.Training
    steps = sorted(
        {m["step"]: m for m in sink.metric_rows if "train_reward_mean" in m}.values(), key=lambda m: m["step"]
    )
    rewards = [m["train_reward_mean"] for m in steps]
    quarter = max(1, len(rewards) // 4)
    row: dict[str, Any] = {
        "setup": f"RFT on {t.rl_grader['name']}, lr {t.learning_rate:g}"
        + (f", KL beta {t.rl_kl_beta:g}" if t.rl_kl_beta else "")
        + (f", {t.rl_updates_per_sample} updates/sampling" if t.rl_updates_per_sample > 1 else ""),
        "train_s": round(time.perf_counter() - t0, 1),
        "steps": len(steps),
        "s_per_step": round(sum(m["step_s"] for m in steps) / max(len(steps), 1), 2),
        "rollout_s_per_step": round(sum(m.get("rollout_s", 0.0) for m in steps) / max(len(steps), 1), 2),
        "train_reward_first_quarter": round(sum(rewards[:quarter]) / quarter, 4),
        "train_reward_last_quarter": round(sum(rewards[-quarter:]) / quarter, 4),
        "hyperparameters": {
            "learning_rate": t.learning_rate,
            "batch_size": t.batch_size,
            "rl_group_size": t.rl_group_size,
            "rl_max_tokens": t.rl_max_tokens,
            "lr_scheduler": t.lr_scheduler,
            "rl_kl_beta": t.rl_kl_beta,
            "rl_updates_per_sample": t.rl_updates_per_sample,
            "r": cfg.General.lora_config.r,
        },
        **held_out(recipe),
    }
    recipe.cleanup()
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setup | steps | s/step (sampling) | train reward (first → last quarter) | held-out fuzzy_match | "
        "held-out rouge_l | held-out contains answer | answer tokens |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        curve = f"{r['train_reward_first_quarter']:.3f} → {r['train_reward_last_quarter']:.3f}" if "steps" in r else ""
        lines.append(
            f"| {r['setup']} | {r.get('steps', '')} | {r.get('s_per_step', '')} ({r.get('rollout_s_per_step', '')}) | "
            f"{curve} | {r['fuzzy_match']:.3f} | {r['rouge_l']:.3f} | {r['contains_answer passed']:.3f} | "
            f"{r['answer_tokens']} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=320, help="training prompts (one epoch)")
    parser.add_argument("--val", type=int, default=100, help="held-out prompts")
    parser.add_argument("--lrs", default="5e-5,2e-4", help="learning rates, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per answer at most")
    parser.add_argument("--grader", choices=list(GRADERS), default="fuzzy_match", help="the grader trained on")
    parser.add_argument("--no-base", action="store_true", help="skip the base row")
    parser.add_argument("--setups", default="grpo", help=f"comma-separated, each lr: {', '.join(SETUPS)}")
    args = parser.parse_args(argv)

    model_dir, _ = prepare_models(None)
    train, val = prompts_from_arc(args.train, args.val)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {}
        for kind, records in (("train", train), ("val", val)):
            files[kind] = work / f"{kind}.jsonl"
            files[kind].write_text("".join(json.dumps(r) + "\n" for r in records))
        lrs = [float(x) for x in args.lrs.split(",")]
        if not args.no_base:
            base_cfg = config(model_dir, files["train"], files["val"], len(train), lrs[0], args)
            rows.append(run(base_cfg, work / "base", base=True))
            print(json.dumps(rows[-1]), flush=True)
        for setup in args.setups.split(","):
            for lr in lrs:
                cfg = config(model_dir, files["train"], files["val"], len(train), lr, args, setup)
                rows.append({**run(cfg, work / f"rft-{setup}-{lr}", base=False), "name": setup})
                print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    grader = GRADERS[args.grader]
    figures = {"train_prompts": len(train), "val_prompts": len(val), "grader": grader, "rows": rows, "markdown": table}
    named = "" if args.setups == "grpo" else "-" + args.setups.replace(",", "-")
    write_machine_results(f"rft-{args.grader}{named}", torch.get_num_threads(), figures)


if __name__ == "__main__":
    main()
