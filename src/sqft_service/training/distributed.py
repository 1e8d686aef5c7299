"""Data-parallel training: what the recipe does differently when it is one rank of a process group.

Whoever starts the ranks initialises ``torch.distributed`` first (the subprocess runner's local launcher,
``jobs/local_ranks.py``, or Ray Train's ``TorchTrainer``); the recipe then asks :meth:`DataParallel.current`.
The contract, for ``N = world_size > 1``:

* every optimizer step takes ``batch_size x gradient_accumulation_steps x N`` examples (the *global*
  batch): the epoch's micro-batches are cut at ``batch_size x N`` and rank ``r`` takes every ``N``-th
  example of each (``shard``), so the examples of a step are exactly those of a 1-rank run with
  ``batch_size x N``. The learning rate applies to that global batch and nothing is rescaled;
* the loss stays a token mean over the whole global step: the step's label count is summed over the
  ranks before the backward, each rank backpropagates ``loss_sum / global_labels``, and the adapter
  gradients are summed (one flat buffer, ``all_reduce_grads``). Clipping and the optimizer then see the
  same gradient on every rank, so the replicas stay identical without a broadcast per step;
* rank 0 alone decides to stop, and under NLS every rank checks that it trains the same sub-adapter
  in that step: the masked super-adapter has the same shapes whatever the ranks, so a mismatch would
  silently mix sub-adapters in the sum instead of failing.

A step makes two collectives, and neither makes the host wait for a GPU. ``step_header`` exchanges
what the host already knows before the step (rank 0's stop flag, the step number, the sub-adapter,
the label and token counts) in one all-gather of a few integers over gloo on CPU tensors (a side
group when the main one is NCCL: an NCCL result read on the host would wait for every queued kernel).
``all_reduce_grads`` sums the gradients with the step's loss sum and correct count appended to the same
flat buffer, so the loss totals stay on the device and are read at logging points, as with one rank.

We sum the gradients ourselves rather than wrap the model in ``DistributedDataParallel``: a rank whose
share of the last, short micro-batch is empty must still join the reduction (DDP's hooks fire only
after a backward), gradient accumulation needs no ``no_sync`` bookkeeping, and one flat all-reduce per
step is what DDP's bucketing would amount to for a few MB of adapter weights anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class RanksDisagree(RuntimeError):
    """The ranks of one job are not running the same step (a bug, never the user's input)."""


class RankLost(RuntimeError):
    """A collective failed: another rank died or stopped answering. The job was cut short, not wrong."""


def _collective(collective: Callable[..., object], *args: object, **kwargs: object) -> None:
    # gloo reports a dead peer as a RuntimeError ("Connection closed by peer") at once, and a stuck one
    # when the group's timeout runs out.
    try:
        collective(*args, **kwargs)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RankLost(f"a data-parallel rank was lost: {first}") from exc


@dataclass(frozen=True)
class StepHeader:
    """What the ranks agreed on before a step: rank 0's stop flag and the global label and token counts."""

    stop: bool
    n_labels: int
    n_real: int


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the job's process group (``world_size`` 1: no group, nothing to do).

    ``host_group``: the gloo group for values the host holds (``None``: the default group is gloo).
    """

    rank: int = 0
    world_size: int = 1
    host_group: object | None = field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> DataParallel:
        """This process's place; with an NCCL group, creates the gloo side group (every rank calls this once)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            host = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
            return cls(dist.get_rank(), dist.get_world_size(), host)
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes events, checkpoints, metrics and the adapter."""
        return self.rank == 0

    def shard(self, global_batch: Sequence[int]) -> list[int]:
        """This rank's examples of a global micro-batch: every ``world_size``-th, from ``rank``.

        Strided rather than contiguous: length-grouped batches are sorted longest first, so a stride
        gives every rank a similar number of tokens. A short last batch may leave a rank nothing.
        """
        return list(global_batch[self.rank :: self.world_size])

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors (its CUDA path is not in every build).
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def step_header(
        self, stop: bool, step: int, sub_adapter: Sequence[int] | None, n_labels: int, n_real: int
    ) -> StepHeader:
        """Agree on optimizer step ``step + 1`` before it runs: one all-gather of host integers.

        Args:
            stop: This rank's wish to stop (only rank 0's counts: it hands its decision to all).
            step: The optimizer steps taken so far (every rank must be at the same one).
            sub_adapter: The NLS ranks this rank drew for the step, or ``None`` without NLS.
            n_labels: Label tokens in this rank's share of the step.
            n_real: Real (non-pad) tokens in this rank's share of the step.

        Returns:
            Rank 0's stop flag and the label and token counts summed over the ranks.

        Raises:
            RanksDisagree: a rank is at another step or drew another NLS sub-adapter.
        """
        if not self.enabled:
            return StepHeader(stop, n_labels, n_real)
        digest = fingerprint(sub_adapter) if sub_adapter is not None else -1
        mine = torch.tensor([int(stop), step, digest, n_labels, n_real], dtype=torch.long)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        _collective(dist.all_gather, gathered, mine, group=self.host_group)
        rows = torch.stack(gathered)
        if not bool((rows[:, 1] == step).all()):
            raise RanksDisagree(f"ranks are at different steps: {rows[:, 1].tolist()}")
        if not bool((rows[:, 2] == digest).all()):
            raise RanksDisagree(f"ranks disagree on the NLS sub-adapter of step {step + 1}")
        return StepHeader(bool(rows[0, 0]), int(rows[:, 3].sum()), int(rows[:, 4].sum()))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks of host values, in float64 (e.g. an evaluation's totals)."""
        if not self.enabled:
            return [float(v) for v in values]
        buffer = torch.tensor(list(values), dtype=torch.float64)
        _collective(dist.all_reduce, buffer, op=dist.ReduceOp.SUM, group=self.host_group)
        return buffer.tolist()

    def all_reduce_grads(
        self, params: Iterable[torch.nn.Parameter], extras: Sequence[torch.Tensor] = ()
    ) -> list[torch.Tensor]:
        """Sum the gradients of ``params`` over the ranks, in place, through one flat buffer.

        A parameter without a gradient on this rank (no examples this step) contributes zeros and gets
        the sum, so every rank ends with the same ``.grad`` on every parameter.

        Args:
            params: The trained parameters.
            extras: 0-dim tensors summed in the same buffer (the step's loss sum and correct count).

        Returns:
            The summed ``extras``, as fp32 0-dim tensors on the reduction's device (not read here).
        """
        if not self.enabled:
            return list(extras)
        params = list(params)
        device = self._device()
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
                for p in params
            ]
            + [e.reshape(1).to(device, torch.float32) for e in extras]
        )
        _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            summed = flat[offset : offset + n].view_as(p).to(p.device, p.dtype)
            offset += n
            if p.grad is None:
                p.grad = summed
            else:
                p.grad.copy_(summed)
        return [flat[offset + i] for i in range(len(extras))]

    def check_same(self, what: str, value: int) -> None:
        """Fail on every rank when the ranks hold different values (e.g. the step they resume from).

        Raises:
            RanksDisagree: the values differ.
        """
        if not self.enabled:
            return
        low_high = torch.tensor([-value, value], dtype=torch.long)
        _collective(dist.all_reduce, low_high, op=dist.ReduceOp.MAX, group=self.host_group)
        low, high = -int(low_high[0]), int(low_high[1])
        if low != high:
            raise RanksDisagree(f"ranks disagree on {what}: between {low} and {high}")

    def dropout_seed(self, seed: int, step: int) -> int:
        """A torch seed per (rank, step): ranks draw different dropout masks, and a resumed run the same ones."""
        digest = hashlib.sha256(f"sqft-dropout:{seed}:{self.rank}:{step}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fingerprint(ranks: Sequence[int]) -> int:
    """A 62-bit digest of a sub-adapter's ranks, stable across processes and machines."""
    digest = hashlib.sha256(",".join(str(int(r)) for r in ranks).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
