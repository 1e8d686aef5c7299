"""The reinforcement fine-tuning recipe: :class:`FinetuneRecipe`'s loop, steps and checkpoints, with
each step's batch sampled and graded first (``training/reinforcement.py``).

What the supervised loop calls an example is a prompt here: ``batch_size`` prompts per micro-batch,
sharded over data-parallel ranks and split after running out of memory exactly as examples are. Each
rank samples its prompts' answers once per step (seeded by the seed, the step and the rank, so a
resumed job samples the same answers again), and the passes of the step train on them. An NLS
super-adapter samples with its maximal sub-adapter; the step's drawn sub-adapter then trains on them.

With ``rl_updates_per_sample`` μ > 1 every global batch of prompts is μ consecutive steps: the first
samples, the others train on its answers, which are kept on disk (``.rl-sampling-<step>.rank<r>.pt``)
until a later resume point no longer needs them, so a job stopped within a sampling resumes exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..graders import judge_models
from .loss import LossOutput, causal_lm_of
from .memory import in_fitting_batches
from .precision import head_cast_once
from .recipe import FinetuneRecipe, TrainerState
from .records import DataValidationError
from .reinforcement import (
    Prompt,
    Rollout,
    group_advantages,
    policy_gradient_loss,
    rollout_batch,
    score_answers,
    token_logps,
    tokenize_prompts,
)
from .sampling import sample_answers


class ReinforcementRecipe(FinetuneRecipe):
    unit = "prompts"

    def __init__(self, *args: Any, judges: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates_per_batch = self.cfg.Training.rl_updates_per_sample
        self.judges = judges or {}  # a model grader's judge: its ModelSpec by name
        self._answerer: Any = None
        self._rollouts: dict[int, list[Rollout]] = {}  # this step's sampled answers, by prompt index
        self._loss_stats: dict[str, Any] = {}  # policy_gradient_loss's sums over the step's passes
        self._guide: tuple[Any, str] | None = None  # rl_response_format's (llguidance tokenizer, grammar)
        self._in_step = False  # a collate within a step re-splits its passes after running out of memory
        self._next_step = 0
        self._step_scores = (0.0, 0, 0)  # this step's score sum, answer count and answer tokens, all ranks
        self._rollout_s = 0.0

    # ------------------------------------------------------------------ data
    def _tokenize(self, records: list[dict], source: str | None) -> list:
        t, ds = self.cfg.Training, self.cfg.Dataset
        missing = [m for m in judge_models(t.rl_grader or {}) if m not in self.judges] if t.rl_grader else []
        if missing:
            raise DataValidationError(
                f"the grader's judge `{missing[0]}` was not resolved for this job (the service resolves it when "
                "the job is created)",
                param="Training.rl_grader",
            )
        room = ds.max_length - t.rl_max_tokens
        if room < 1:
            raise DataValidationError(
                f"`Dataset.max_length` {ds.max_length} leaves no room for a prompt before `rl_max_tokens` "
                f"{t.rl_max_tokens} answer tokens",
                param="Training.rl_max_tokens",
            )
        prompts, dropped = tokenize_prompts(records, self.tokenizer, t.rl_grader or {}, room)
        if dropped:
            self.sink.message(
                f"{dropped} prompt(s) longer than {room} tokens (`Dataset.max_length` less `rl_max_tokens`) "
                "were skipped",
                level="warn",
            )
        return prompts

    def _longest_row(self) -> int:
        return max(len(p) for p in self.train_examples) + self.cfg.Training.rl_max_tokens

    def _resume(self) -> TrainerState | None:
        state = super()._resume()
        self._next_step = state.step if state else 0
        return state

    # ------------------------------------------------------------- sampling
    def _sample(self, prompts: list[Prompt], group: int, temperature: float | None, seed: int) -> list[list[int]]:
        """Answers to ``prompts`` (``group`` each, prompt-major) from the model as it is now, without dropout."""
        self.model.eval()
        if self.handles.nls is not None:
            self.handles.nls.activate_maximal()
        torch.manual_seed(seed)
        try:
            with self._autocast(), head_cast_once(causal_lm_of(self.model), self.autocast_dtype):
                return sample_answers(
                    self.model,
                    [p.ids for p in prompts],
                    group,
                    max_tokens=self.cfg.Training.rl_max_tokens,
                    temperature=temperature,
                    pad_id=self.collator.pad_token_id,
                    eos_ids=self._eos_ids(),
                    processors=self._format_guide(),
                )
        finally:
            self.model.train()

    def _format_guide(self) -> Any:
        """``rl_response_format``'s guide for a batch of answers (inference/guided.py, as serving holds a
        request's answer), or None for free text."""
        fmt = self.cfg.Training.rl_response_format
        if not fmt:
            return None
        if self._guide is None:
            from ..inference.engine import InferenceEngine
            from ..inference.guided import JSON_OBJECT_SCHEMA, GuideTokenizers, json_grammar

            schema = fmt["json_schema"].get("schema", {}) if fmt["type"] == "json_schema" else JSON_OBJECT_SCHEMA
            eos = InferenceEngine._guide_eos(self.model, self.tokenizer)
            self._guide = (GuideTokenizers().get(self.tokenizer, eos), json_grammar(schema))
        lltokenizer, grammar = self._guide

        def processors(rows: int, width: int) -> Any:
            from transformers import LogitsProcessorList

            from ..inference.guided import guide_processor

            return LogitsProcessorList([guide_processor(lltokenizer, grammar, rows, width)])

        return processors

    def _eos_ids(self) -> list[int]:
        from ..inference.engine import InferenceEngine  # the tokens serving stops at (evaluation.py's too)

        return sorted(InferenceEngine._eos_ids(self.model, self.tokenizer))

    def _texts(self, answers: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)

    def _grade(self, items: list[dict[str, Any]], answers: list[list[int]]) -> tuple[list[float], int]:
        """The grader's scores of ``answers`` (and how many it could not grade: scored 0)."""
        return score_answers(self.cfg.Training.rl_grader or {}, items, self._texts(answers), self._judge)

    def _judge(self) -> Any:
        """The batch job's answerer on an engine of this process's own, holding the judge (loaded once)."""
        if self._answerer is None:
            from ..inference.engine import InferenceEngine
            from ..jobs.batch import Answerer

            engine = InferenceEngine(
                threads=torch.get_num_threads(), max_queue=0, max_models=1, model_cache_dir=self.model_cache_dir
            )
            self._answerer = Answerer(engine, self.judges)
        return self._answerer

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's steps, each repeated ``rl_updates_per_sample`` times: the steps of one sampling."""
        batches, accum = super()._batches(epoch), self.cfg.Training.gradient_accumulation_steps
        groups = [batches[first : first + accum] for first in range(0, len(batches), accum)]
        return [b for g in groups for _ in range(self.updates_per_batch) for b in g]

    def _roll_out(self, indices: list[int], step: int) -> None:
        """Sample, grade and weigh step ``step``'s answers to this rank's prompts ``indices``."""
        t = self.cfg.Training
        group = t.rl_group_size
        prompts = [self.train_examples[i] for i in indices]
        t0 = time.perf_counter()
        answers = self._sample(prompts, group, t.rl_temperature, self.seed * 1_000_003 + step * 1009 + self.dp.rank)
        items = [p.item for p in prompts for _ in range(group)]
        graded, failed = self._grade(items, answers)
        scores = torch.tensor(graded).view(-1, group)
        advantages = group_advantages(scores)
        # An answer whose advantage is 0 trains nothing, unless a KL penalty holds its tokens to the base.
        self._rollouts = {
            i: [
                Rollout(prompts[j].ids, answers[j * group + k], float(advantages[j, k]))
                for k in range(group)
                if advantages[j, k] != 0 or t.rl_kl_beta > 0
            ]
            for j, i in enumerate(indices)
        }
        self._keep_logps([r for rows in self._rollouts.values() for r in rows])
        total, count, tokens = self.dp.sum([float(scores.sum()), scores.numel(), sum(len(a) for a in answers)])
        self._step_scores = (total, int(count), int(tokens))
        if self.updates_per_batch > 1:
            self._save_block(step)
        self._rollout_s = time.perf_counter() - t0
        self._untimed_s = self._rollout_s  # the step's time and the ETA include its sampling
        if step == 0 or (step + 1) % t.logging_steps == 0 or failed:
            ungraded = f"; {failed} the grader could not grade scored 0" if failed else ""
            self.sink.message(
                f"step {step + 1}: sampled {len(answers)} answers in {self._rollout_s:.1f} s, "
                f"mean score {total / max(count, 1):.4f}{ungraded}",
                level="warn" if failed else "info",
            )

    def _train_step(self, *args: Any, **kwargs: Any) -> Any:
        self._in_step = True
        self._loss_stats = {}  # a retry in more passes counts anew
        try:
            return super()._train_step(*args, **kwargs)
        finally:
            self._in_step = False

    def _collate(self, shards: list[list[int]]) -> list[dict[str, Any]]:
        if not self._in_step:  # a new step (a retry in more passes trains the same answers)
            indices, step = [i for s in shards for i in s], self._next_step
            self._next_step += 1
            # The first step of a sampling samples; the others train on its answers (those kept on disk
            # when a resumed job starts within a sampling's steps).
            within = step % self.updates_per_batch
            self._rollout_s = 0.0  # a step that trains on an earlier sampling's answers samples nothing
            if within == 0 or (not self._rollouts and not self._load_block(step - within, indices)):
                self._roll_out(indices, step)
            # The step's dropout masks from (seed, rank, step) alone: the same after a resume, whether or not
            # this step sampled (sampling reseeds the generator; a resumed step within a sampling does not).
            torch.manual_seed(self.dp.dropout_seed(self.seed, step))
        passes = []
        for idx in self.forward_split.shards(shards):
            rows = [r for i in idx for r in self._rollouts[i]]
            if rows:
                passes.append(self._prepare(rollout_batch(rows, self.collator.pad_token_id)))
        if not passes:  # every group scored its answers alike: one row of weight 0 keeps the step's shape
            first = next(iter(self._rollouts))
            prompt = self.train_examples[first]
            filler = rollout_batch([Rollout(prompt.ids, [prompt.ids[-1]], 0.0)], self.collator.pad_token_id)
            passes.append(self._prepare(filler))
            passes[0]["n_label_tokens"] = 0
        return passes

    def _forward(self, batch: dict[str, Any]) -> LossOutput:
        t = self.cfg.Training
        clip = (t.rl_clip_epsilon, t.rl_clip_epsilon_high or t.rl_clip_epsilon)
        with self._autocast():
            return policy_gradient_loss(self.model, batch, clip=clip, kl_beta=t.rl_kl_beta, stats=self._loss_stats)

    # ------------------------------------------ kept log-probabilities, blocks
    def _keep_logps(self, rollouts: list[Rollout]) -> None:
        """Each answer token's log-probability under the sampling policy (several updates per sampling:
        PPO's ratio) and under the base model (a KL penalty), computed once per sampling."""
        t = self.cfg.Training
        if not rollouts or (self.updates_per_batch == 1 and t.rl_kl_beta == 0):
            return
        pad = self.collator.pad_token_id

        def logps(chunk: list[Rollout]) -> list[list[float]]:
            return token_logps(self.model, chunk, pad, self.device)

        def run() -> list[list[float]]:
            with self._autocast():
                chunks = in_fitting_batches(rollouts, t.batch_size * t.rl_group_size, logps, self.device)
            return [row for chunk in chunks for row in chunk]

        self.model.eval()  # no dropout; an NLS super-adapter as it sampled (maximal)
        if self.handles.nls is not None:
            self.handles.nls.activate_maximal()
        try:
            if self.updates_per_batch > 1:
                for r, values in zip(rollouts, run(), strict=True):
                    r.old_logps = values
            if t.rl_kl_beta > 0:
                with self.model.disable_adapter():
                    for r, values in zip(rollouts, run(), strict=True):
                        r.ref_logps = values
        finally:
            self.model.train()

    def _block_path(self, step: int) -> Path:
        return self.output_dir / f".rl-sampling-{step:08d}.rank{self.dp.rank}.pt"

    def _save_block(self, step: int) -> None:
        """This rank's answers of the sampling at ``step``, for a job resumed within its steps."""
        kept = {
            "rollouts": {i: [asdict(r) for r in rows] for i, rows in self._rollouts.items()},
            "scores": list(self._step_scores),
        }
        staging = self._block_path(step).with_suffix(".tmp")
        torch.save(kept, staging)
        staging.replace(self._block_path(step))

    def _load_block(self, step: int, indices: list[int]) -> bool:
        """The answers of the sampling at ``step`` back from disk (False: not there, or not these prompts)."""
        path = self._block_path(step)
        if not path.exists():
            self.sink.message(f"the answers sampled at step {step + 1} are gone: sampling again", level="warn")
            return False
        kept = torch.load(path, weights_only=True)
        rollouts = {int(i): [Rollout(**r) for r in rows] for i, rows in kept["rollouts"].items()}
        if sorted(rollouts) != sorted(indices):
            return False
        total, count, tokens = kept["scores"]
        self._rollouts, self._step_scores = rollouts, (float(total), int(count), int(tokens))
        return True

    def _drop_blocks(self, before: int | None) -> None:
        """Delete this rank's kept samplings older than step ``before`` (None: all of them)."""
        for path in self.output_dir.glob(f".rl-sampling-*.rank{self.dp.rank}.pt"):
            if before is None or int(path.name.split("-")[2].split(".")[0]) < before:
                path.unlink(missing_ok=True)

    def save_resume_state(self, step: int, epoch: int, trained_tokens: int) -> None:
        super().save_resume_state(step, epoch, trained_tokens)
        self._drop_blocks(step - step % self.updates_per_batch)  # a resume starts at or after this point

    def save_checkpoint(self, step: int, epoch: int, row: dict[str, Any], trained_tokens: int = 0) -> Path:
        directory = super().save_checkpoint(step, epoch, row, trained_tokens)
        self._drop_blocks(step - step % self.updates_per_batch)
        return directory

    def train(self) -> Any:
        result = super().train()
        self._drop_blocks(None)  # done: nothing resumes any more
        return result

    def _step_metrics(self) -> dict[str, Any]:
        total, count, tokens = self._step_scores
        row = {
            "train_reward_mean": round(total / max(count, 1), 6),
            # Mean sampled length: a grader that rewards brevity (or length) shows here first.
            "train_answer_tokens": round(tokens / max(count, 1), 2),
            "rollout_s": round(self._rollout_s, 3),
        }
        t, stats = self.cfg.Training, self._loss_stats
        if t.rl_kl_beta > 0 or self.updates_per_batch > 1:  # TRL's `kl` and `clip_ratio`, per answer token
            tokens, kl, clipped = self.dp.sum([float(stats.get(k, 0)) for k in ("tokens", "kl", "clipped")])
            if t.rl_kl_beta > 0:
                row["train_kl"] = round(kl / max(tokens, 1), 6)
            if self.updates_per_batch > 1:
                row["train_clip_fraction"] = round(clipped / max(tokens, 1), 6)
        return row

    # ----------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``valid_reward_mean``: the grader's mean score of answers to the validation prompts (one greedy
        answer each, or ``rl_eval_samples`` sampled at ``rl_temperature``), and ``valid_answer_tokens``
        their mean length."""
        self._settle_losses()
        t = self.cfg.Training
        group = t.rl_eval_samples or 1
        temperature = t.rl_temperature if t.rl_eval_samples else None
        mine = self._my_share(self.eval_examples)
        total, tokens = 0.0, 0
        for first in range(0, len(mine), t.batch_size):
            prompts = [self.eval_examples[i] for i in mine[first : first + t.batch_size]]
            answers = self._sample(prompts, group, temperature, self.seed + first)
            items = [p.item for p in prompts for _ in range(group)]
            total += sum(self._grade(items, answers)[0])
            tokens += sum(len(a) for a in answers)
        total, count, tokens = self.dp.sum([total, len(mine) * group, tokens])
        metrics = {
            "valid_reward_mean": round(total / max(count, 1), 6),
            "valid_answer_tokens": round(tokens / max(count, 1), 2),
        }
        if self._metric_rows:
            self._metric_rows[-1].update(metrics)
        return metrics
