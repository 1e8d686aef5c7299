"""Operators dispatched per training step, HF Trainer + peft vs ours: a CPU proxy for a GPU's kernel launches.

On a launch-bound GPU row (small models, short rows: the host cannot queue kernels as fast as the GPU
runs them) a step costs about one kernel launch per operator that reaches a device kernel. Those
operators can be counted on any machine: a ``TorchDispatchMode`` sees every operator below autograd,
forward and backward, as the GPU would get it. The count depends on the model's structure (layers,
adapted projections), not its width, so each shape keeps its layer count at a tiny width.

The counts are split by where the operator comes from: the optimizer and gradient clipping (one fused
kernel per dtype group on a GPU, so left out of the comparison) and the rest (forward + backward).
Ours runs with SDPA attention, the bf16 frozen base and the fused dropout kernel as on a GPU; both run
under bf16 autocast.

    python -m bench.gpu.launches [--shapes smollm2-135m,llama-3.2-1b] [--setups hf,ours_lora,...]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from bench.throughput.inputs import REPO, RESULTS

from .inputs import SHAPES, data_dir, data_file, tokenizer_dir

SETUPS = ["hf", "ours_lora", "ours_nls", "ours_sparsepeft"]
_OPTIMIZER_FILES = ("/torch/optim/", "/torch/nn/utils/clip_grad.py", "/torch/amp/grad_scaler.py")
# Metadata-only operators: no kernel on any device.
_NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.detach", "aten.expand",
              "aten.slice", "aten.unsqueeze", "aten.squeeze", "aten.as_strided", "aten.alias", "aten.permute",
              "aten.select", "aten.reshape", "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.empty",
              "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
              "aten.lift_fresh", "aten.sym_size", "aten.sym_stride", "aten.is_same_size", "aten.set_"}  # fmt: skip


def width_only(shape: str) -> str:
    """Register (once) and return the tiny-width copy of ``shape``: same layers, hidden size 64."""
    name = f"{shape}@w64"
    if name not in SHAPES:
        base = SHAPES[shape]
        SHAPES[name] = dict(
            SHAPES["tiny"],
            num_hidden_layers=base["num_hidden_layers"],
            tie_word_embeddings=base["tie_word_embeddings"],
        )
    return name


def count_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one setup for ``warmup`` steps, then count the operators of ``PROFILED_STEPS`` more."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from . import setups
    from .profile import PROFILED_STEPS, Capture

    torch.set_num_threads(1)
    width_only(spec["shape"].removesuffix("@w64"))
    from sqft_service.adapters import dropout

    dropout.INTEGER_DRAW_DEVICES.clear()  # LoRA dropout as on a GPU: its fused kernel, not the CPU's integer draw

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[tuple[str, bool]] = collections.Counter()
            self.sites: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name not in _NO_KERNEL:
                stack = traceback.extract_stack(limit=40)
                self.ops[(name, any(k in f.filename for f in stack for k in _OPTIMIZER_FILES))] += 1
                if name == spec.get("sites"):  # where this operator is called from, outside torch
                    ours = [f for f in stack[:-1] if "site-packages/torch/" not in f.filename][-3:]
                    self.sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(ours))] += 1
            return func(*args, **(kwargs or {}))

    class Counting(Capture):
        def begin(self, step: int) -> None:
            if step == self.first:
                self._mode = Counter()
                self._mode.__enter__()

        def end(self, step: int) -> None:
            if step == self.last and getattr(self, "_mode", None) is not None:
                self._mode.__exit__(None, None, None)
                ops, sites, self._mode = self._mode.ops, self._mode.sites, None
                per_step = collections.Counter()
                for (name, optimizer), n in ops.items():
                    per_step[name if not optimizer else "optimizer"] += n
                self.summary = {
                    "ops_per_step": round(sum(v for (_, o), v in ops.items() if not o) / PROFILED_STEPS, 1),
                    "optimizer_ops_per_step": round(sum(v for (_, o), v in ops.items() if o) / PROFILED_STEPS, 1),
                    "top": {k: round(v / PROFILED_STEPS, 1) for k, v in per_step.most_common(12)},
                }
                if sites:
                    self.summary["sites"] = {k: round(v / PROFILED_STEPS, 1) for k, v in sites.most_common(15)}

    setups.Capture = Counting
    row = setups.run_setup(spec)
    return {"setup": spec["setup"], **(row.get("profile") or {}), "status": row.get("status", "ok")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.launches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--data", default="arce", choices=["arce", "gsm8k"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sites", help="also list where this operator is called from (e.g. aten._to_copy)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child).with_suffix(".out.json").write_text(json.dumps(count_child(spec)))
        return
    work = Path(tempfile.mkdtemp(prefix="sqft-launches-"))
    data = data_file(args.data, data_dir(None), work)
    tokenizer = tokenizer_dir(None, work)
    rows = []
    for shape in args.shapes.split(","):
        layers = SHAPES[shape]["num_hidden_layers"]
        for setup in args.setups.split(","):
            spec = dict(device="cpu", shape=width_only(shape), setup=setup, warmup=1, steps=1, seed=0,
                        batch_size=args.batch_size, samples=64, data=data, tokenizer=tokenizer,
                        tmp=str(work / f"{shape}-{setup}"), profile=True, attn="sdpa", sites=args.sites)  # fmt: skip
            path = work / f"{shape}-{setup}.json"
            path.write_text(json.dumps(spec))
            subprocess.run([sys.executable, "-m", "bench.gpu.launches", "--child", str(path)], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            row = {"shape": shape, "layers": layers, **json.loads(path.with_suffix(".out.json").read_text())}
            rows.append(row)
            print(f"{shape:14s} {setup:16s} ops/step {row.get('ops_per_step')} (+ optimizer "
                  f"{row.get('optimizer_ops_per_step')}): {row.get('top')}", flush=True)  # fmt: skip
            for site, n in row.get("sites", {}).items():
                print(f"    {n:7.1f}  {site}")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stamp}-launches-cpu.json"
    meta = {"what": __doc__.split("\n\n")[0], "data": args.data, "batch_size": args.batch_size, "date": stamp}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
