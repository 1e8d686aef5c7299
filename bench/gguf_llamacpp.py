"""A QA-SparsePEFT merge, exported to GGUF, run by llama.cpp: ``python -m bench.gguf_llamacpp``.

The whole SQFT route on SmolLM2-135M-Instruct: the GGUF pruned to 50% (magnitude), QA-SparsePEFT
(INT4, groups of 64) trained on ARC-E, merged, and written with ``merge --gguf`` (adapted layers as
their trained integers in ``Q4_1``, the rest f16). llama.cpp (``llama-cpp-python``; not a dependency
of the service: pass ``--llama-cpp-path`` to a directory it is installed in) then scores the held-out
ARC-E responses with

* ``ours``: that file;
* ``requantized``: the same merged model written at f16 and its adapted layers re-quantized to
  ``Q4_1`` from the floats, as ``llama-quantize`` would (``gguf.quants``, GGML's reference rounding):
  what a user who converts the merged float model gets;

against the merged model's own loss in transformers (float32; equal to the trained forward). It also
reports file sizes, greedy answers' agreement with transformers, and llama.cpp's decode speed.
Figures go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sqft_service.gguf_export import copy_fields

from .auto_hparams import prepare_data
from .throughput.inputs import CACHE, TARGETS, default_model
from .throughput.report import write_machine_results


def train_qa(sparse_dir: str, train: Path, val: Path, out: Path, steps: int, lr: float) -> Path:
    from sqft_service.config import FinetuneConfig
    from sqft_service.training.events import MemorySink
    from sqft_service.training.recipe import run_training

    cfg = FinetuneConfig.model_validate(
        {
            "General": {
                "base_model": sparse_dir,
                "lora_config": {
                    "r": 16,
                    "lora_alpha": 32,
                    "lora_dropout": 0.0,
                    "target_modules": TARGETS,
                    "sparse_adapter": True,
                    "quantization_aware": True,
                },
            },
            "Dataset": {"train_file": str(train), "validation_file": str(val)},
            "Training": {
                "batch_size": 8,
                "max_train_steps": steps,
                "learning_rate": lr,
                "warmup_steps": 3,
                "mixed_precision": "no",
                "seed": 42,
                "logging_steps": 1000,
            },
        }
    )
    return run_training(cfg, out, MemorySink(echo=False), model_cache_dir=CACHE / "models").adapter_dir


def requantize(src: Path, dst: Path, names: set[str]) -> None:
    """``src`` with the tensors in ``names`` re-quantized to Q4_1 from their de-quantized floats."""
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    copy_fields(reader, writer, lambda name: True)
    for t in reader.tensors:
        if t.name in names:
            floats = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(
                t.name,
                gguf.quants.quantize(floats, gguf.GGMLQuantizationType.Q4_1),
                raw_dtype=gguf.GGMLQuantizationType.Q4_1,
            )
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def held_out(val: Path, model_dir: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of the validation records, tokenized as the job trained."""
    from transformers import AutoTokenizer

    from sqft_service.config import DatasetSection
    from sqft_service.training.records import load_records
    from sqft_service.training.tokenization import tokenize_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_records(load_records(val), tok, DatasetSection())
    return [(ex.input_ids, ex.labels) for ex in data]


def nll_transformers(model, examples) -> float:
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def nll_llamacpp(llama, examples) -> float:
    total = count = 0.0
    for ids, labels in examples:
        llama.reset()
        llama.eval(ids)
        logits = np.asarray(llama.scores[: len(ids) - 1], dtype=np.float64)
        target = np.asarray(labels[1:])
        keep = target != -100
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        total -= float(logp[keep, target[keep]].sum())
        count += int(keep.sum())
    return total / count


def greedy_llamacpp(llama, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    llama.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    for token in llama.generate(prompt_ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def greedy_transformers(model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt_ids) :].tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf_llamacpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-path", default=None, help="a directory where llama_cpp is installed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.llama_cpp_path:
        sys.path.insert(0, args.llama_cpp_path)
    import llama_cpp

    from sqft_service import model_ops

    work = Path(tempfile.mkdtemp(prefix="sqft-gguf-bench-"))
    source = default_model()
    train, val = prepare_data(work, {"arc_e": args.steps * 8, "gsm8k": 0}, {"arc_e": args.val, "gsm8k": 0})["arc_e"]
    sparse_dir = work / "sparse"
    model_ops.sparsify(str(source), sparse_dir, method="magnitude", sparsity=0.5, model_cache_dir=CACHE / "models")
    t0 = time.perf_counter()
    adapter = train_qa(str(sparse_dir), train, val, work / "job", args.steps, args.lr)
    train_s = time.perf_counter() - t0
    merged = model_ops.merge(str(sparse_dir), adapter, work / "merged", sparse=True, gguf_type="f16")
    ours = Path(merged["gguf"]["path"])
    adapted = {t.name for t in gguf.GGUFReader(str(ours)).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1}
    # The merged float model (its QA layers' values are exact in f16 too), then those layers
    # re-quantized by GGML's own rounding.
    from transformers import AutoModelForCausalLM

    from sqft_service.gguf_export import export_gguf

    hf = AutoModelForCausalLM.from_pretrained(merged["path"], dtype=torch.float32).eval()
    plain = work / "plain-f16.gguf"
    export_gguf(hf, source, plain, "f16")
    requant = work / "requantized.gguf"
    requantize(plain, requant, adapted)

    examples = held_out(val, str(sparse_dir))
    figures: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct GGUF, 50% magnitude-sparse, QA-SparsePEFT INT4 g64",
        "llama_cpp_python": llama_cpp.__version__,
        "settings": {"steps": args.steps, "lr": args.lr, "batch_size": 8, "r": 16, "val_records": len(examples)},
        "train_s": round(train_s, 1),
        "export": merged["gguf"],
        "merged_transformers_valid_loss": round(nll_transformers(hf, examples), 6),
        "files_mb": {},
        "llama_cpp": {},
    }
    prompts = [ids[: next(i for i, x in enumerate(labels) if x != -100)] for ids, labels in examples[:8]]
    reference = [greedy_transformers(hf, p, args.new_tokens) for p in prompts]
    for name, path in (("ours", ours), ("requantized", requant), ("f16", plain)):
        figures["files_mb"][name] = round(path.stat().st_size / 2**20, 1)
        llama = llama_cpp.Llama(
            str(path), n_ctx=1024, logits_all=True, n_threads=torch.get_num_threads(), verbose=False
        )
        row: dict[str, Any] = {"valid_loss": round(nll_llamacpp(llama, examples), 6)}
        same = tokens = 0
        seconds = 0.0
        for p, ref in zip(prompts, reference, strict=True):
            got, s = greedy_llamacpp(llama, p, args.new_tokens)
            seconds += s
            tokens += len(got)
            same += int(got[: len(ref)] == ref)  # transformers stops at the end token
        row["greedy_answers_equal_to_transformers"] = f"{same}/{len(prompts)}"
        row["decode_tokens_per_s"] = round(tokens / seconds, 1)
        figures["llama_cpp"][name] = row
        print(name, row, flush=True)
        del llama
    write_machine_results("gguf-llamacpp", torch.get_num_threads(), figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
