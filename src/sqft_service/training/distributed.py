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
* rank 0 alone decides to stop (``agree_step`` hands its flag to all ranks at the start of a step), and
  under NLS every rank checks that it trains the same sub-adapter in that step (``check_sub_adapter``):
  the masked super-adapter has the same shapes whatever the ranks, so a mismatch would silently mix
  sub-adapters in the sum instead of failing.

We sum the gradients ourselves rather than wrap the model in ``DistributedDataParallel``: a rank whose
share of the last, short micro-batch is empty must still join the reduction (DDP's hooks fire only
after a backward), gradient accumulation needs no ``no_sync`` bookkeeping, and one flat all-reduce per
step is what DDP's bucketing would amount to for a few MB of adapter weights anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
class DataParallel:
    """This process's place in the job's process group (``world_size`` 1: no group, nothing to do)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DataParallel:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
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

    def agree_step(self, stop: bool, step: int) -> bool:
        """Rank 0's stop flag, for every rank, at the start of optimizer step ``step + 1``.

        Raises:
            RanksDisagree: a rank is at another step.
        """
        if not self.enabled:
            return stop
        mine = torch.tensor([int(stop), step], dtype=torch.long, device=self._device())
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        _collective(dist.all_gather, gathered, mine)
        rows = torch.stack(gathered).cpu()
        if not bool((rows[:, 1] == step).all()):
            raise RanksDisagree(f"ranks are at different steps: {rows[:, 1].tolist()}")
        return bool(rows[0, 0])

    def check_sub_adapter(self, ranks: Sequence[int]) -> None:
        """Every rank trains the same NLS sub-adapter this step (each draws it from ``(seed, step)``).

        Raises:
            RanksDisagree: the sub-adapters differ.
        """
        if self.enabled:
            self.check_same("the NLS sub-adapter", fingerprint(ranks))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks, in float64 (label counts, loss sums, token counts)."""
        if not self.enabled:
            return [float(v) for v in values]
        buffer = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        _collective(dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
        return buffer.cpu().tolist()

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in place, through one flat buffer.

        A parameter without a gradient on this rank (no examples this step) contributes zeros and gets
        the sum, so every rank ends with the same ``.grad`` on every parameter.
        """
        if not self.enabled:
            return
        params = list(params)
        device = self._device()
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
                for p in params
            ]
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

    def check_same(self, what: str, value: int) -> None:
        """Fail on every rank when the ranks hold different values (e.g. the step they resume from).

        Raises:
            RanksDisagree: the values differ.
        """
        if not self.enabled:
            return
        low_high = torch.tensor([-value, value], dtype=torch.long, device=self._device())
        _collective(dist.all_reduce, low_high, op=dist.ReduceOp.MAX)
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
