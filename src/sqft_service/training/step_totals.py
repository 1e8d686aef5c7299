"""A training step's loss figures, left where they were computed until someone reads them.

Reading a CUDA tensor's value (``float(t)``, ``.item()``) makes the host wait for every kernel queued
before it, so a loop that reads its loss after each micro-batch runs the GPU in lock-step with
Python: no step is queued while the previous one computes. The recipe therefore keeps each step's
summed loss and correct count as device tensors and reads them at its logging points, a few steps
late; on the CPU, where nothing is queued, it reads them at once, as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class StepTotals:
    """The summed token loss and the correct-prediction count of one optimizer step.

    Args:
        loss_sums: One 0-dim fp32 tensor per micro-batch (detached).
        corrects: One 0-dim integer tensor per micro-batch (fp32 once summed over data-parallel ranks).
        margins: DPO: one 0-dim fp32 tensor per micro-batch, its pairs' summed reward margins.
        padded_tokens: This rank's input tensor elements over the passes that ran the step (a host int).
    """

    def __init__(
        self,
        loss_sums: list[torch.Tensor],
        corrects: list[torch.Tensor],
        margins: list[torch.Tensor] | None = None,
        padded_tokens: int = 0,
    ) -> None:
        self._loss_sums = loss_sums
        self._corrects = corrects
        self._margins = margins or []
        self.padded_tokens = padded_tokens
        self._values: tuple[float, int] | None = None
        self._margin: float | None = None

    def margin(self) -> float | None:
        """The summed DPO reward margin on the host (None for a supervised step), read once."""
        if self._margin is None and self._margins:
            self._margin = float(torch.stack(self._margins).sum())
            self._margins = []
        return self._margin

    def read(self) -> tuple[float, int]:
        """``(loss_sum, correct)`` on the host: one device-to-host copy per step, the first time only."""
        if self._values is None:
            losses = torch.stack(self._loss_sums).tolist() if self._loss_sums else []
            corrects = torch.stack(self._corrects).tolist() if self._corrects else []
            # Added in micro-batch order from 0.0, as the loop always has: the same float on the CPU.
            loss_sum = 0.0
            for value in losses:
                loss_sum += value
            self._values = (loss_sum, int(sum(corrects)))
            self._loss_sums, self._corrects = [], []
        return self._values


@dataclass
class PendingStep:
    """A step whose metrics row waits for its loss (see :meth:`FinetuneRecipe._settle_losses`)."""

    totals: StepTotals
    n_labels: int
    nls_ranks: list[int] | None = None
    row: dict[str, Any] = field(default_factory=dict)
    loss: float | None = None

    def settle(self) -> tuple[float, float]:
        """Fill the row's ``train_loss`` / ``train_accuracy``; returns them unrounded."""
        loss_sum, correct = self.totals.read()
        loss = loss_sum / max(self.n_labels, 1)
        accuracy = correct / max(self.n_labels, 1)
        self.row["train_loss"] = round(loss, 6)
        self.row["train_accuracy"] = round(accuracy, 6)
        if (margin := self.totals.margin()) is not None:  # DPO: the mean reward margin of the step's pairs
            self.row["train_reward_margin"] = round(margin / max(self.n_labels, 1), 6)
        self.loss = loss
        return loss, accuracy
