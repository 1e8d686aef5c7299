"""Per-step hooks for :class:`~sqft_service.training.recipe.FinetuneRecipe`.

The public way to observe or pace the training loop without touching its internals, modelled on
HF ``TrainerCallback.on_step_begin`` / ``on_step_end``. Pass hooks as
``FinetuneRecipe(..., step_hooks=[hook])``; for every optimizer step the loop calls, in order::

    hook.before_step(step)          # outside the step's timing: a hook may block here (e.g. a turn gate)
    ... NLS draw, forward/backward of every micro-batch, clip, optimizer + scheduler step ...
    hook.after_step(step, stats)    # also outside the timing

``step`` is the 1-based number of the optimizer step (the ``step`` of its metrics row). Hooks run in
list order; an exception from a hook ends training like one from the loop. Subclass
:class:`StepHook` and override either method, or pass any object with both methods.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    """What the loop measured for one optimizer step."""

    step: int  # 1-based optimizer step number
    epoch: int  # 0-based epoch the step belongs to
    seconds: float  # wall time of the NLS draw (if any) + every micro-batch's forward/backward + the update
    real_tokens: int  # non-pad input tokens over all micro-batches (what tokens/s counts)
    padded_tokens: int  # input tensor elements over all micro-batches (real + padding)
    label_tokens: int  # tokens that took a loss
    # The step's training loss (mean over its label tokens). None on a GPU between logging points:
    # reading it there would make the host wait for the device every step (training/step_totals.py).
    loss: float | None


class StepHook:
    """Base class with no-op methods; override what you need."""

    def before_step(self, step: int) -> None:
        """Called before step ``step`` starts (before its timing starts)."""

    def after_step(self, step: int, stats: StepStats) -> None:
        """Called once step ``step`` is done (optimizer and scheduler stepped, grads zeroed)."""
