"""Preference training (OpenAI's ``method.type: "dpo"``): pairs, their batches and the DPO loss.

Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290) trains the policy π on pairs
of replies to one prompt, a preferred y_w and another y_l, against a frozen reference π_ref:

    loss = -log sigmoid(beta [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])

where log π(y) sums the reply's token log-probabilities (``Training.dpo_loss`` picks IPO, hinge or
robust DPO instead: ``preference_losses``; or SimPO, which needs no reference: ``dpo_loss``). The
reference is the model the job starts from: adapters begin as a zero update (LoRA's B = 0, for every
NLS rank and SparsePEFT mask), so the reference log-probabilities are those of the policy before its
first step. They are computed once,
in one no-grad pass before training (TRL's ``precompute_ref_log_probs``), instead of a second forward
per step; the recipe keeps them beside the outputs so a resumed job finds them again.

A pair's chosen and rejected sequences go through the same decoder forward (padded or packed), so a
preference step costs a supervised step on twice the sequences. The step's loss is a mean over its
pairs: each batch reports its pair count as ``n_label_tokens``, the count the recipe divides by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .records import as_openai_preference
from .tokenization import IGNORE_INDEX, TokenizedExample, tokenize_records

if TYPE_CHECKING:
    import torch

    from sqft_service.config import DatasetSection

    from .loss import LossOutput


@dataclass
class PreferencePair:
    """A prompt's preferred (``chosen``) and other (``rejected``) reply, each tokenized with the prompt.

    ``reference``: the reference model's summed reply log-probabilities ``(chosen, rejected)``, set
    before training.
    """

    chosen: TokenizedExample
    rejected: TokenizedExample
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def longest(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def tokenize_pairs(
    records: Sequence[dict[str, Any]], tokenizer: Any, cfg: DatasetSection
) -> tuple[list[PreferencePair], int]:
    """Preference records (validated by :mod:`.records`) as pairs, and how many were dropped.

    Each reply is rendered after the input messages with the chat template and is the only target
    (earlier assistant turns of the input are context). A pair is dropped when either reply has no
    token left after truncation.
    """
    conversations = [
        {"messages": [*rec["input"]["messages"], rec[key][0]], "tools": rec["input"].get("tools")}
        for rec in map(as_openai_preference, records)
        for key in ("preferred_output", "non_preferred_output")
    ]
    tokenized = tokenize_records(conversations, tokenizer, cfg, last_turn_only=True)
    by_index = dict(zip(tokenized.kept, tokenized.examples, strict=True))
    pairs = [
        PreferencePair(by_index[2 * i], by_index[2 * i + 1])
        for i in range(len(records))
        if 2 * i in by_index and 2 * i + 1 in by_index
    ]
    return pairs, len(records) - len(pairs)


class PairCollator:
    """Collates pairs with a supervised collator (padded or packed), chosen and rejected interleaved.

    Adds ``label_examples`` (the sequence each label token belongs to: 2i chosen, 2i+1 rejected, in
    the row-major order the loss takes label tokens), ``n_pairs``, ``reference_logps`` (``[pairs, 2]``,
    once the pairs have their reference) and sets ``n_label_tokens`` to the pair count.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
        import torch

        batch = self.inner([ex for p in pairs for ex in (p.chosen, p.rejected)])
        labels = batch["labels"]
        example_ids = batch.pop("example_ids", None)
        if example_ids is None:  # padded: one sequence per row
            example_ids = torch.arange(labels.shape[0])[:, None].expand_as(labels)
        # Position t predicts token t+1, which belongs to example_ids[:, t+1].
        batch["label_examples"] = example_ids[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        batch["n_pairs"] = len(pairs)
        batch["n_label_tokens"] = len(pairs)
        if all(p.reference is not None for p in pairs):
            batch["reference_logps"] = torch.tensor([p.reference for p in pairs], dtype=torch.float32)
        return batch


def sequence_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """``[pairs, 2]``: each reply's summed token log-probability (chosen, rejected), in fp32."""
    import torch

    from .loss import label_token_losses

    row_losses, _ = label_token_losses(model, batch)
    sums = torch.zeros(2 * batch["n_pairs"], dtype=torch.float32, device=row_losses.device)
    return sums.index_add(0, batch["label_examples"], row_losses).neg().view(-1, 2)


def reply_token_counts(batch: dict[str, Any]) -> torch.Tensor:
    """``[pairs, 2]``: how many label tokens each reply has (chosen, rejected)."""
    import torch

    examples = batch["label_examples"]
    counts = torch.zeros(2 * batch["n_pairs"], dtype=torch.float32, device=examples.device)
    return counts.index_add(0, examples, torch.ones_like(examples, dtype=torch.float32)).view(-1, 2)


def preference_losses(margins: torch.Tensor, beta: float, loss_type: str, smoothing: float) -> torch.Tensor:
    """Per pair, the loss of ``margins`` h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))
    (IPO's: of per-token log-ratios), as TRL computes each ``loss_type``:

    * ``sigmoid`` (DPO; with smoothing ε, conservative DPO): -(1 - ε) log sigmoid(βh) - ε log sigmoid(-βh);
    * ``robust`` (Chowdhury et al., 2024): (-(1 - ε) log sigmoid(βh) + ε log sigmoid(-βh)) / (1 - 2ε);
    * ``hinge`` (SLiC, Zhao et al., 2023): max(0, 1 - βh);
    * ``ipo`` (Azar et al., 2023, arXiv 2310.12036): (h - 1/(2β))².
    """
    import torch.nn.functional as F

    if loss_type == "ipo":
        return (margins - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return F.relu(1 - beta * margins)
    agree, disagree = F.logsigmoid(beta * margins), F.logsigmoid(-beta * margins)
    if loss_type == "robust":
        return (-(1 - smoothing) * agree + smoothing * disagree) / (1 - 2 * smoothing)
    return -(1 - smoothing) * agree - smoothing * disagree


def dpo_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    beta: float,
    loss_type: str = "sigmoid",
    smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> LossOutput:
    """The summed preference loss of the batch's pairs (``preference_losses``); ``n_correct`` counts the
    pairs whose chosen reply gained more log-probability over the reference than the rejected one, and
    ``reward_sums`` sums the implicit rewards beta * (log π - log π_ref) of the chosen and rejected replies.

    ``simpo`` (SimPO, Meng et al., 2024, arXiv 2405.14734) has no reference: its rewards are beta times each
    reply's average token log-probability, and the loss -log sigmoid(reward margin - ``simpo_gamma``)
    (label smoothing as for ``sigmoid``), as TRL's CPO trainer computes ``loss_type="simpo"``."""
    import torch.nn.functional as F

    from .loss import LossOutput

    logps = sequence_logps(model, batch)
    if loss_type == "simpo":
        average = logps / reply_token_counts(batch).clamp(min=1)
        rewards = beta * average
        margins = average[:, 0] - average[:, 1]
        z = beta * margins - simpo_gamma
        losses = -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)
        n_correct, reward_sums = (margins > 0).sum(), rewards.detach().sum(0)
        return LossOutput(losses.sum(), n_correct, batch["n_pairs"], reward_sums)
    ratios = logps - batch["reference_logps"]  # [pairs, 2]
    rewards = beta * ratios  # DPO's implicit rewards
    if loss_type == "ipo":  # IPO compares average per-token log-ratios, so length does not weigh
        ratios = ratios / reply_token_counts(batch).clamp(min=1)
    margins = ratios[:, 0] - ratios[:, 1]
    return LossOutput(
        loss_sum=preference_losses(margins, beta, loss_type, smoothing).sum(),
        n_correct=(margins > 0).sum(),
        n_labels=batch["n_pairs"],
        reward_sums=rewards.detach().sum(0),
    )
