"""Device memory: a step that runs out of it is retried in smaller passes, and a GPU job reports its peak.

A micro-batch that does not fit on the GPU (``torch.OutOfMemoryError``) is not a failed job: its
examples run in more forward/backward passes of fewer examples each (:class:`ForwardSplit`). The loss
of a step is a sum over label tokens divided by the step's label count, so the step's gradient, loss
and update are the same whether its examples go through in one pass or in several (to float
rounding); only the speed changes. This differs from ``transformers``' ``auto_find_batch_size``,
which halves the batch and so changes the training run. Nothing is saved between runs: a job resumed
after a restart finds its split again at its first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from ..errors import UserError

T = TypeVar("T")
R = TypeVar("R")


class DeviceOutOfMemory(UserError):
    """Even one example per pass does not fit in the device's memory."""

    code = "out_of_memory"


def split_shard(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in at most ``parts`` consecutive runs of near-equal length (no empty run)."""
    size = math.ceil(len(indices) / parts) if indices else 0
    return [indices[i : i + size] for i in range(0, len(indices), size)] if size else []


def free_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks back, so the next pass starts from what is really held."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def in_use(device: torch.device) -> str:
    """The device's memory held by tensors and its total, for a message ("" on the CPU)."""
    if device.type != "cuda":
        return ""
    total = torch.cuda.get_device_properties(device).total_memory
    return f" ({torch.cuda.memory_allocated(device) / 2**30:.1f} GiB held of {total / 2**30:.1f} GiB)"


def peak_gib(device: torch.device) -> float | None:
    """The most memory tensors held on a GPU since the job started, in GiB (an allocator count: no sync)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


class ForwardSplit:
    """How many passes each micro-batch's examples take: 1, doubled after each out-of-memory step."""

    def __init__(self) -> None:
        self.parts = 1

    def shards(self, shards: list[list[int]]) -> list[list[int]]:
        """Each rank's micro-batch shards cut into this many passes."""
        return [part for idx in shards for part in split_shard(idx, self.parts)]

    def widen(self, shards: list[list[int]], device: torch.device, step: int, error: str) -> str:
        """After an out-of-memory pass in ``step``: double the passes, and say so.

        Raises:
            DeviceOutOfMemory: the passes already held one example each.
        """
        largest = max((len(idx) for idx in self.shards(shards)), default=0)
        if largest <= 1:
            raise DeviceOutOfMemory(
                f"{device} out of memory in step {step} with one example per pass{in_use(device)}: set "
                "`General.enable_gradient_checkpointing`, lower `Dataset.max_length`, or use a larger device "
                f"({error})"
            )
        self.parts *= 2
        now = max(len(idx) for idx in self.shards(shards))
        return (
            f"{device} out of memory in step {step} with {largest} example(s) per pass{in_use(device)}: each "
            f"micro-batch now runs in {self.parts} passes of up to {now}; the batch, loss and update are unchanged"
        )


def in_fitting_batches(
    items: Sequence[T], batch_size: int, run: Callable[[Sequence[T]], R], device: torch.device
) -> list[R]:
    """``run`` over ``items`` in consecutive batches of ``batch_size``, halving the batch whenever one
    runs out of device memory (an evaluation's batches: each item's result does not depend on its
    companions, so the results are the same whatever the batch).

    Raises:
        DeviceOutOfMemory: a batch of one item does not fit.
    """
    results: list[R] = []
    start, size = 0, max(1, batch_size)
    while start < len(items):
        chunk = items[start : start + size]
        try:
            results.append(run(chunk))
            start += len(chunk)
            continue
        except torch.OutOfMemoryError as exc:
            error = (str(exc).splitlines() or ["OutOfMemoryError"])[0][:300]
        # Out of the except block: the failed batch's tensors went with its traceback.
        free_cached(device)
        if size == 1:
            raise DeviceOutOfMemory(
                f"{device} out of memory with one example per batch{in_use(device)}: lower `max_new_tokens` "
                f"or evaluate on a larger device ({error})"
            )
        size //= 2
    return results
