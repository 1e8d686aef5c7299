"""Exact resume: what a checkpoint holds so that training continues as if it had never stopped.

A resumable checkpoint is a PEFT adapter directory plus two files:

* ``trainer_state.json``: step, epoch, trained tokens, the metric rows so far, Python's RNG state;
* ``trainer_state.pt``: optimizer, LR scheduler, torch RNG and NLS search statistics (tensors only,
  read back with ``weights_only=True``: nothing in it is unpickled as code).

The data order needs no state of its own: an epoch's batches are a function of ``(seed, epoch)``
(``batching.length_grouped_batches``), and NLS draws its sub-adapter from ``(seed, step)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..workspace import TrainingOutputs

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"


@dataclass
class TrainerState:
    step: int
    epoch: int
    trained_tokens: int
    metric_rows: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    nls: dict[str, torch.Tensor] | None = None

    def save(self, directory: Path) -> None:
        """Write the state into a checkpoint directory (the caller publishes the directory atomically)."""
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "trained_tokens": self.trained_tokens,
            "metric_rows": self.metric_rows,
            "python_rng": random.getstate(),
        }
        (directory / STATE_JSON).write_text(json.dumps(meta))
        tensors = {
            # CPU tensors, so a checkpoint of a GPU job opens on a machine without one (and resumes there).
            "optimizer": _on_cpu(self.optimizer),
            "scheduler": self.scheduler,
            "torch_rng": torch.get_rng_state(),
            # A GPU job's dropout draws from the CUDA generator: without its state a resume is not exact.
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "nls": _on_cpu(self.nls),
        }
        torch.save(tensors, directory / STATE_TENSORS)

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        """Read a state and restore the global RNGs to where they were when it was saved."""
        meta = json.loads((directory / STATE_JSON).read_text())
        # map_location: older GPU checkpoints may hold CUDA tensors; the optimizer moves its state
        # onto its parameters' device in load_state_dict.
        tensors = torch.load(directory / STATE_TENSORS, weights_only=True, map_location="cpu")
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["torch_rng"])
        cuda_rng = tensors.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        return cls(
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            trained_tokens=int(meta["trained_tokens"]),
            metric_rows=list(meta["metric_rows"]),
            optimizer=tensors["optimizer"],
            scheduler=tensors["scheduler"],
            nls=tensors["nls"],
        )


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in its dicts / lists / tuples on the CPU (CPU tensors are not copied)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def saved_step(directory: Path) -> int | None:
    """The step a resumable checkpoint was taken at, or None if ``directory`` is not one."""
    try:
        if not (directory / STATE_TENSORS).is_file():
            return None
        return int(json.loads((directory / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def latest_resume_point(outputs: TrainingOutputs) -> tuple[Path, int] | None:
    """The most advanced resumable checkpoint of a run: the rolling resume state or a step checkpoint."""
    # A kill between publish_dir's two renames leaves the previous resume point only under its ".old"
    # name: it is complete (it was the published one), so it counts.
    parent = outputs.resume_state.parent
    candidates = [outputs.resume_state, *parent.glob(f".{outputs.resume_state.name}.*.old")]
    if outputs.checkpoints.is_dir():
        candidates += [d for d in outputs.checkpoints.iterdir() if d.is_dir() and not d.name.startswith(".")]
    best: tuple[Path, int] | None = None
    for directory in candidates:
        step = saved_step(directory)
        if step is not None and (best is None or step > best[1]):
            best = (directory, step)
    return best
