"""The elastic-rank super-adapter of Neural Low-rank Adapter Search (SQFT, arXiv 2410.03750, Sec. 3.1).

NLS trains one LoRA super-adapter of maximal rank ``r`` and, at every step, activates a random
sub-adapter: each search dimension (one target-module group inside one decoder layer) picks an
active rank ``r' <= r`` from its search space, and the adapters of that dimension compute with
``A[:r']`` and ``B[:, :r']`` only. The reference implementation patches PEFT's ``lora.Linear`` to slice
the weights; here stock PEFT is kept and the slice is expressed as a mask:

* the controller owns one tensor ``rank_mask`` of shape ``[n_dims, max_rank]`` (row ``d`` is 1 on the
  first ``r'_d`` entries, 0 elsewhere);
* a forward hook on every ``lora_A[adapter]`` multiplies its output (the rank-``r`` bottleneck
  activation) by the row of its dimension (``FusedLoraLinear`` and the SparsePEFT layer, which compute
  ``lora_A`` inline, read the same row through :func:`nls_rank_mask`, or find it already applied to
  their bf16 copy of ``B`` under autocast: ``adapters/autocast.py``). ``B @ diag(m) @ A`` equals
  ``B[:, :r'] @ A[:r']``, and the masked rows/columns receive exactly zero gradient, so forward and
  backward match the sliced computation while the scaling stays ``lora_alpha / r`` (a sub-adapter is
  a slice, not rescaled);
* switching sub-adapters is one in-place write into ``rank_mask``: no walk over modules, no retracing.

Hooks live outside the state dict, so ``save_pretrained`` writes an ordinary PEFT LoRA checkpoint
(the full super-adapter). PEFT's own ``merge`` of the live model ignores the mask (except under
SparsePEFT, whose delta reads it): to deploy a sub-adapter, use ``extract_sub_adapter``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..peft_utils import check_rank, layer_index, lora_layers, matches_module

STATS_FILE = "nls_stats.json"
_SLOT_ATTR = "_sqft_nls_slot"


@dataclass
class SearchDimension:
    """One searchable rank: the adapters of one module group inside one decoder layer.

    Attributes:
        index: Position in the (group-major) configuration vector.
        layer: Decoder layer index, parsed from the module path (``...layers.<i>...``).
        group: Index into ``target_module_groups``.
        modules: Full module names (relative to the base model, as PEFT's ``rank_pattern`` sees them).
        space: The candidate ranks, in the order given by the user.
    """

    index: int
    layer: int
    group: int
    modules: list[str]
    space: list[int]


def nls_rank_mask(module: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The active-rank mask row of a LoRA layer under NLS (``None`` without NLS).

    Used by the fused LoRA and SparsePEFT forwards, which do not call ``lora_A`` and so bypass the hook.
    """
    slot = getattr(module, _SLOT_ATTR, None)
    if slot is None:
        return None
    controller = slot[0]()
    return None if controller is None else controller.mask_row(slot[1], like)


def nls_mask_version(module: nn.Module) -> int:
    """The version counter of the rank mask a LoRA layer reads under NLS (-1 without NLS): it moves
    whenever another sub-adapter is activated."""
    slot = getattr(module, _SLOT_ATTR, None)
    controller = None if slot is None else slot[0]()
    return -1 if controller is None else controller.rank_mask._version


class ElasticRankController:
    """Holds the rank mask of an NLS super-adapter and samples / activates sub-adapters.

    Args:
        peft_model: A ``PeftModel`` whose LoRA adapters all have rank ``max_rank``.
        groups: ``target_module_groups``: each group lists module names (PEFT suffix semantics).
        spaces: One rank list per group (``LoraSection.parsed_search_space()``).
        max_rank: The super-adapter rank ``r``.
        seed: Seed of the sampler; with ``(seed, step)`` every worker draws the same sub-adapter.
        adapter: The PEFT adapter name.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        groups: list[list[str]],
        spaces: list[list[int]],
        max_rank: int,
        seed: int,
        adapter: str = "default",
    ) -> None:
        if len(groups) != len(spaces):
            raise ValueError(f"{len(groups)} module groups but {len(spaces)} search spaces")
        self.max_rank, self.seed, self.adapter = int(max_rank), int(seed), adapter
        self.groups = [list(g) for g in groups]
        members: dict[tuple[int, int], list[tuple[str, LoraLayer]]] = {}
        for name, module in lora_layers(peft_model, adapter):
            leaf_hits = [g for g, keys in enumerate(groups) if any(matches_module(name, k) for k in keys)]
            if not leaf_hits:
                continue
            rank = module.r[adapter]
            if rank != self.max_rank:
                raise ValueError(f"LoRA layer {name!r} has rank {rank}, expected the super-adapter rank {max_rank}")
            layer = layer_index(name)
            if layer is None:
                raise ValueError(f"module {name!r} has no layer index in its path (expected '...layers.<i>...')")
            members.setdefault((leaf_hits[0], layer), []).append((name, module))
        if not members:
            raise ValueError("no LoRA layer matches `target_module_groups`")
        # Group-major order (all layers of group 0, then group 1, ...), as in the reference README.
        self.dimensions: list[SearchDimension] = []
        self._modules: list[list[nn.Module]] = []
        for d, (group, layer) in enumerate(sorted(members)):
            entries = members[(group, layer)]
            space = [int(r) for r in spaces[group]]
            for r in space:
                check_rank(r, self.max_rank, f"search space {space} of group {group}")
            self.dimensions.append(SearchDimension(d, layer, group, [n for n, _ in entries], space))
            self._modules.append([m for _, m in entries])
        n, width = len(self.dimensions), max(len(d.space) for d in self.dimensions)
        self._space = torch.zeros(n, width, dtype=torch.long)
        self._space_len = torch.tensor([len(d.space) for d in self.dimensions])
        for d in self.dimensions:
            self._space[d.index, : len(d.space)] = torch.tensor(d.space)
        self._arange = torch.arange(self.max_rank)
        device = next(iter(self._modules[0][0].lora_A[adapter].parameters())).device
        self.rank_mask = torch.ones(n, self.max_rank, device=device)
        self._mask_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._fill_mask_cache()
        self.active: list[int] = [d.space[0] for d in self.dimensions]
        self._draws = torch.zeros(n, self.max_rank + 1, dtype=torch.long)
        self._loss_sum = torch.zeros(n, self.max_rank + 1, dtype=torch.float64)
        self._loss_n = torch.zeros(n, self.max_rank + 1, dtype=torch.long)
        self._handles = []
        me = weakref.ref(self)
        for d, modules in enumerate(self._modules):
            for module in modules:
                setattr(module, _SLOT_ATTR, (me, d))
                self._handles.append(module.lora_A[adapter].register_forward_hook(_make_hook(me, d)))
        self.activate_maximal()

    # -- mask plumbing -------------------------------------------------------------------------------
    def _fill_mask_cache(self) -> None:
        # Every float dtype a forward may ask for, made now: a compiled layer guards on this dict's
        # keys, so a key added at the first forward would recompile it at the second.
        self._mask_cache.clear()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            mask = self.rank_mask if dtype == self.rank_mask.dtype else self.rank_mask.to(dtype)
            self._mask_cache[(self.rank_mask.device, dtype)] = mask

    def mask_row(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Row ``index`` of the rank mask on ``like``'s device and dtype (a cached view, no copy)."""
        key = (like.device, like.dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = self.rank_mask.to(device=like.device, dtype=like.dtype)
            self._mask_cache[key] = mask
        return mask[index]

    def _write(self, ranks: torch.Tensor) -> None:
        # Rows become [1]*r' + [0]*(r-r'), built on the host where the ranks were drawn. On a GPU
        # the new mask goes over from pinned memory without waiting for the device (the caching
        # host allocator keeps the pinned block alive until the copy has run).
        rows = self._arange.unsqueeze(0) < ranks.cpu().unsqueeze(1)
        if self.rank_mask.device.type == "cuda":
            rows = rows.to(self.rank_mask.dtype).pin_memory()
            self.rank_mask.copy_(rows, non_blocking=True)
        else:
            self.rank_mask.copy_(rows)
        # One small in-place copy per cached dtype besides the mask itself (bf16, fp16).
        for mask in self._mask_cache.values():
            if mask.data_ptr() != self.rank_mask.data_ptr():
                mask.copy_(self.rank_mask)

    # -- public API ----------------------------------------------------------------------------------
    def _draw(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        pick = (torch.rand(len(self.dimensions), generator=gen) * self._space_len).long()
        pick = torch.minimum(pick, self._space_len - 1)
        return self._space.gather(1, pick.unsqueeze(1)).squeeze(1)

    def draw(self, step: int) -> list[int]:
        """The sub-adapter :meth:`sample` would activate at ``step``, without activating or counting it."""
        return self._draw(step).tolist()

    def sample(self, step: int, drawn: list[int] | None = None) -> list[int]:
        """Draw and activate a sub-adapter: each dimension's rank uniformly from its space.

        Args:
            step: The global optimisation step; the generator is seeded from ``(seed, step)``.
            drawn: What :meth:`draw` returned for ``step``, if the caller already drew it.

        Returns:
            The active rank of every dimension (group-major order).
        """
        ranks = self._draw(step) if drawn is None else torch.tensor(drawn)
        self._draws[torch.arange(len(ranks)), ranks] += 1
        self._write(ranks)
        self.active = ranks.tolist()
        return list(self.active)

    def activate(self, ranks: list[int]) -> None:
        """Activate an explicit sub-adapter (one rank per dimension, each in its space).

        Raises:
            ValueError: On a wrong length or a rank outside its dimension's space.
        """
        if len(ranks) != len(self.dimensions):
            raise ValueError(f"expected {len(self.dimensions)} ranks (one per dimension), got {len(ranks)}")
        for d, r in zip(self.dimensions, ranks, strict=True):
            if int(r) not in d.space:
                raise ValueError(
                    f"ranks[{d.index}] = {r} is not in the search space {d.space} of dimension {d.index} "
                    f"(layer {d.layer}, group {d.group})"
                )
        self._write(torch.tensor([int(r) for r in ranks]))
        self.active = [int(r) for r in ranks]

    def activate_maximal(self) -> None:
        """Activate the full super-adapter (every dimension at rank ``max_rank``)."""
        self._write(torch.full((len(self.dimensions),), self.max_rank))
        self.active = [self.max_rank] * len(self.dimensions)

    def to(self, device: torch.device | str) -> ElasticRankController:
        """Keep the rank mask on ``device`` (call after moving the model there)."""
        self.rank_mask = self.rank_mask.to(device)
        self._fill_mask_cache()
        return self

    def record_loss(self, loss: float, ranks: list[int] | None = None) -> None:
        """Attribute a step's loss to the ranks active in that step (search statistics).

        Args:
            loss: The step's training loss.
            ranks: The sub-adapter of that step (default: the active one). A GPU job reads losses
                back a few steps late, after other sub-adapters were drawn, so it passes them.
        """
        ranks = torch.tensor(self.active if ranks is None else ranks)
        rows = torch.arange(len(ranks))
        self._loss_sum[rows, ranks] += float(loss)
        self._loss_n[rows, ranks] += 1

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable search statistics: per dimension, draws and mean loss per rank."""
        dims = []
        for d in self.dimensions:
            per_rank = {}
            for r in d.space:
                n = int(self._loss_n[d.index, r])
                per_rank[str(r)] = {
                    "draws": int(self._draws[d.index, r]),
                    "loss_steps": n,
                    "mean_loss": float(self._loss_sum[d.index, r]) / n if n else None,
                }
            dims.append({"index": d.index, "layer": d.layer, "group": d.group, "ranks": per_rank})
        return {"n_dimensions": len(dims), "seed": self.seed, "dimensions": dims}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The search statistics as tensors (for exact resume; sampling itself depends on (seed, step) only)."""
        return {"draws": self._draws.clone(), "loss_sum": self._loss_sum.clone(), "loss_n": self._loss_n.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._draws.copy_(state["draws"])
        self._loss_sum.copy_(state["loss_sum"])
        self._loss_n.copy_(state["loss_n"])

    def save_stats(self, path: str | Path) -> Path:
        """Write :meth:`stats` to ``path`` (a directory gets ``nls_stats.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        path.write_text(json.dumps(self.stats(), indent=2))
        return path

    def describe(self) -> list[dict[str, Any]]:
        """The dimensions as plain dicts (for ``elastic_adapter_config.json``)."""
        return [asdict(d) for d in self.dimensions]

    def remove(self) -> None:
        """Detach the hooks: the model computes with its full-rank adapters again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for modules in self._modules:
            for module in modules:
                if hasattr(module, _SLOT_ATTR):
                    delattr(module, _SLOT_ATTR)


def _make_hook(controller_ref: weakref.ref, index: int):
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        controller = controller_ref()
        if controller is None:
            return output
        return output * controller.mask_row(index, output)

    return hook
