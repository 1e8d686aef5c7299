"""Reinforcement fine-tuning (OpenAI's ``method.type: "reinforcement"``): GRPO with a grader.

Every step takes ``batch_size`` prompts, samples ``rl_group_size`` answers to each from the model being
trained (no dropout, at ``rl_temperature``), scores every answer with the job's grader (``graders.py``:
the Evals API's string_check / text_similarity), and turns the scores into advantages within each
prompt's group: ``(score - group mean) / (group std + 1e-4)`` (GRPO, Shao et al. 2024, as TRL computes
it). The loss is the policy gradient ``-A * log p(token)`` summed over the sampled tokens and divided by
the step's sampled-token count (DAPO's token-level normalisation). By default one update per sampling,
so the importance ratio is 1 and PPO's clipping never acts, and no KL term (TRL's GRPO default, beta 0);
``rl_updates_per_sample`` > 1 trains each sampling's answers several steps under PPO's clipped ratio to
the policy that sampled them, and ``rl_kl_beta`` > 0 adds the k3 KL estimate to the base model (the
adapter off), each from log-probabilities kept once per sampling (``token_logps``).

That loss is a cross-entropy weighted per token by the advantage of the answer the token belongs to,
so it runs through the supervised chunked label cross-entropy (``training/loss.py``): the lm_head
sees the answer positions only and the logits never exist whole. A group whose answers all score the
same carries no signal (every advantage 0) and is left out of the backward, unless a KL penalty holds
its tokens to the base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..graders import (
    MODEL_GRADERS,
    MULTI,
    GradingError,
    combine,
    content_templates,
    grade,
    judge_request,
    model_verdict,
    render,
    render_messages,
    sample_namespace,
    sub_graders,
)
from ..inference.render import chat_ids
from .loss import LossOutput, label_token_losses
from .records import DataValidationError
from .tokenization import IGNORE_INDEX

ADVANTAGE_EPS = 1e-4


@dataclass
class Prompt:
    """One prompt record: its tokens as serving renders them, and the record's fields (the grader's ``item``)."""

    ids: list[int]
    item: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


def prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A prompt record's messages as a chat template takes them ("developer" is the system role)."""
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in record["messages"]]


def tokenize_prompts(
    records: Sequence[dict[str, Any]], tokenizer: Any, grader: dict[str, Any], max_prompt_tokens: int
) -> tuple[list[Prompt], int]:
    """The records as prompts (chat: the template with its generation prompt; Alpaca: its template), and
    how many were dropped for leaving no room to answer within ``Dataset.max_length``.

    Raises:
        DataValidationError: naming the record whose fields a grader template reads but it lacks.
    """
    prompts, dropped = [], 0
    for i, record in enumerate(records):
        item = dict(record)  # the whole line, as OpenAI's graders read it: `item.messages` too
        _check_item(grader, item, i)
        if "messages" in record:
            ids = chat_ids(tokenizer, prompt_messages(record), "chat")
        else:
            ids = chat_ids(tokenizer, [{"role": "user", "content": _alpaca_instruction(record)}], "alpaca")
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        prompts.append(Prompt(ids, item))
    return prompts, dropped


def _alpaca_instruction(record: dict[str, Any]) -> str:
    # chat_ids renders one user message as the Alpaca instruction; an input goes below it as serving can't.
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


class _AnySample(dict):
    """A sample with every field (nested ones too): checking a record, only its own fields can be missing."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: Any) -> Any:
        return _AnySample()


def grader_templates(grader: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, template)`` of each of a grader's templates (a model grader's are its messages)."""
    if grader["type"] == MULTI:
        return [(f"graders.{key}.{w}", t) for key, g in grader["graders"].items() for w, t in grader_templates(g)]
    if grader["type"] in MODEL_GRADERS:
        return [
            (f"input[{j}].content{where}", text)
            for j, m in enumerate(grader["input"])
            for where, text in content_templates(m["content"])
        ]
    return [("input", grader["input"]), ("reference", grader["reference"])]


def _check_item(grader: dict[str, Any], item: dict[str, Any], index: int) -> None:
    """Render the grader's templates against the record before training, not at its first sampling."""
    for where, template in grader_templates(grader):
        try:
            render(template, item, _AnySample())
        except GradingError as exc:
            raise DataValidationError(
                f"record {index + 1}: the grader's `{where}` template can't read it: {exc}", param="training_file"
            ) from None


def score_answers(
    grader: dict[str, Any], items: Sequence[dict[str, Any]], texts: Sequence[str], judge: Callable[[], Any]
) -> tuple[list[float], int]:
    """The grader's score of each answer text against its prompt's record, and how many it could not grade
    (a template reading ``sample.output_json.x`` of an answer that is not such JSON, a failed verdict, a
    multi grader's formula without a value): those score 0. ``judge()``: the answerer model graders ask."""
    parts = {}
    for key, sub in sub_graders(grader).items():
        model = sub["type"] in MODEL_GRADERS
        parts[key] = judge_answers(judge(), sub, items, texts) if model else grade_answers(sub, items, texts)
    scores, failed = [], 0
    for n in range(len(texts)):
        got = {key: part[n] for key, part in parts.items()}
        try:
            if any(score is None for score in got.values()):
                raise GradingError("a grader could not grade the answer")
            scores.append(combine(grader, got))  # type: ignore[arg-type]  # no None left
        except GradingError:
            scores.append(0.0)
            failed += 1
    return scores, failed


def grade_answers(grader: dict[str, Any], items: Sequence[dict[str, Any]], texts: Sequence[str]) -> list[float | None]:
    """A string_check / text_similarity grader's score of each answer (None: it could not grade it)."""
    scores: list[float | None] = []
    for item, text in zip(items, texts, strict=True):
        try:
            scores.append(grade(grader, item, sample_namespace(text, None))[0])
        except GradingError:
            scores.append(None)
    return scores


def judge_answers(
    answerer: Any, grader: dict[str, Any], items: Sequence[dict[str, Any]], texts: Sequence[str]
) -> list[float | None]:
    """A label_model / score_model grader's scores (None: not graded): its judge answers every answer's
    messages (as an eval run's judge does, ``graders.judge_request``) through ``answerer``
    (``jobs/batch.Answerer``)."""
    scores: list[float | None] = [None] * len(texts)
    lines = []
    for n, (item, text) in enumerate(zip(items, texts, strict=True)):
        try:  # a message reading `sample.output_json.x` of an answer that is not such JSON: not asked
            messages = render_messages(grader["input"], item, sample_namespace(text, None))
        except GradingError:
            continue
        lines.append({"custom_id": str(n), "body": judge_request(grader, messages)})
    for custom_id, status, body in answerer.chunk(lines) if lines else []:
        try:
            if status != 200:
                raise GradingError(body["error"]["message"])
            scores[int(custom_id)] = model_verdict(grader, body["choices"][0]["message"].get("content") or "")[0]
        except GradingError:
            pass  # stays None: counted as not graded
    return scores


def group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """GRPO's advantages of ``scores`` ``[prompts, group]``: centred and scaled within each group."""
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + ADVANTAGE_EPS)


@dataclass
class Rollout:
    """One sampled answer to train on: its prompt, its tokens and their advantage; with several updates
    per sampling, each token's log-probability under the policy that sampled it (``old_logps``), and with
    a KL penalty under the base model (``ref_logps``)."""

    prompt: list[int]
    answer: list[int]
    advantage: float
    old_logps: list[float] | None = None
    ref_logps: list[float] | None = None


def rollout_batch(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, Any]:
    """Right-padded rows of prompt + answer: labels and ``label_weights`` (the advantage) on the answer,
    and ``label_old`` / ``label_ref`` (the answer tokens' kept log-probabilities) when the rollouts hold them."""
    width = max(len(r.prompt) + len(r.answer) for r in rollouts)
    shape = (len(rollouts), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    mask = torch.zeros(shape, dtype=torch.long)
    kept = {
        key: torch.zeros(shape, dtype=torch.float32)
        for key, field in (("label_old", "old_logps"), ("label_ref", "ref_logps"))
        if getattr(rollouts[0], field) is not None
    }
    for i, r in enumerate(rollouts):
        n, m = len(r.prompt), len(r.answer)
        input_ids[i, : n + m] = torch.tensor(r.prompt + r.answer)
        labels[i, n : n + m] = torch.tensor(r.answer)
        weights[i, n : n + m] = r.advantage
        mask[i, : n + m] = 1
        for key, values in kept.items():
            values[i, n : n + m] = torch.tensor(r.old_logps if key == "label_old" else r.ref_logps)
    n_real = int(mask.sum())
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "label_weights": weights,
        **kept,
        "n_label_tokens": sum(len(r.answer) for r in rollouts),
        "n_real_tokens": n_real,
        "n_padded_tokens": width * len(rollouts),
    }


def _at_labels(batch: dict[str, Any], key: str) -> torch.Tensor:
    """``batch[key]`` (one value per position) at the answer tokens, in ``label_token_losses``' order."""
    values = batch[key]
    if "label_positions" in batch:  # the device path's host-found positions (loss.label_positions)
        return values.reshape(-1).index_select(0, batch["label_positions"] + 1)
    labels = batch["labels"][:, 1:]
    return values[:, 1:][labels != IGNORE_INDEX]


@torch.no_grad()
def token_logps(
    model: torch.nn.Module, rollouts: Sequence[Rollout], pad_id: int, device: torch.device
) -> list[list[float]]:
    """Each rollout's answer tokens' log-probabilities under ``model`` as it is (one forward, no grad)."""
    batch = rollout_batch(rollouts, pad_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    flat = (-label_token_losses(model, batch)[0]).float().cpu().tolist()
    out, first = [], 0
    for r in rollouts:
        out.append(flat[first : first + len(r.answer)])
        first += len(r.answer)
    return out


def policy_gradient_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    clip: tuple[float, float] = (0.2, 0.2),
    kl_beta: float = 0.0,
    stats: dict[str, torch.Tensor] | None = None,
) -> LossOutput:
    """The step's loss summed over its answer tokens (see the module docstring): ``-A * log p(token)``;
    with kept log-probabilities, GRPO's ``-min(r * A, clip(r, 1 - lo, 1 + hi) * A)`` with ``r`` the ratio to
    the sampling policy (``label_old``; the policy itself, ratio 1, without) plus ``kl_beta`` times the
    k3 estimate of the KL to the base, ``exp(ref - logp) - (ref - logp) - 1`` (``label_ref``).

    ``stats``: sums added to (detached): ``tokens``, ``kl`` (the estimate) and ``clipped`` (tokens whose
    ratio the clip held: past ``1 + hi`` with a positive advantage, below ``1 - lo`` with a negative one)."""
    row_losses, n_correct = label_token_losses(model, batch)
    advantages = _at_labels(batch, "label_weights")
    n_labels = int(row_losses.numel())
    if "label_old" not in batch and "label_ref" not in batch:
        return LossOutput(loss_sum=(row_losses * advantages).sum(), n_correct=n_correct, n_labels=n_labels)
    logps = -row_losses.float()
    old = _at_labels(batch, "label_old") if "label_old" in batch else logps.detach()
    ratio = torch.exp(logps - old)
    clipped = ratio.clamp(1.0 - clip[0], 1.0 + clip[1])
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if "label_ref" in batch:
        gap = _at_labels(batch, "label_ref") - logps
        kl = torch.exp(gap) - gap - 1.0
        per_token = per_token + kl_beta * kl
    if stats is not None:
        held = ((ratio > 1.0 + clip[1]) & (advantages > 0)) | ((ratio < 1.0 - clip[0]) & (advantages < 0))
        for key, value in (("tokens", n_labels), ("clipped", held.sum()), ("kl", kl.sum() if kl is not None else 0)):
            stats[key] = stats.get(key, 0) + (value.detach() if isinstance(value, torch.Tensor) else value)
    return LossOutput(loss_sum=per_token.sum(), n_correct=n_correct, n_labels=n_labels)
