"""Using what was trained, on the GPU: the inference engine serves there in bf16, evaluate jobs score there.

A tiny Llama and a stock-peft LoRA adapter (random B, so it changes the model); the engine answers with
the base, the adapter attached and a SparsePEFT-style merge, every model on the GPU; an evaluate
job's losses on the GPU are those of the same candidates scored on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sqft_service.evaluation import _scores, run_evaluation
from sqft_service.inference.engine import InferenceEngine
from sqft_service.inference.spec import ModelSpec, Sampling
from sqft_service.jobs.kinds import EvalCandidate, EvaluateParams
from sqft_service.training.events import MemorySink
from sqft_service.training.models import load_base_model, load_tokenizer
from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, write_json


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpu_tokenizer_dir) -> tuple[Path, Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serving")
    tokenizer = AutoTokenizer.from_pretrained(gpu_tokenizer_dir)
    model = make_tiny_llama(len(tokenizer), initializer_range=0.3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "model", root / "adapter", write_json(root / "data.json", alpaca_records(8))


def test_the_engine_serves_base_adapter_and_sparse_merge_on_the_gpu_in_bf16(trained):
    model_dir, adapter_dir, _ = trained
    engine = InferenceEngine(threads=2, max_queue=1, max_models=2, model_cache_dir=None, dtype="auto")
    ids = load_tokenizer(str(model_dir))("Name a colour.")["input_ids"]
    greedy = Sampling(max_tokens=6, temperature=0.0)
    specs = {
        "base": ModelSpec(name="base", model=str(model_dir)),
        "lora": ModelSpec(name="ft", model=str(model_dir), adapter=str(adapter_dir), data_format="alpaca"),
        "sparse": ModelSpec(name="sp", model=str(model_dir), adapter=str(adapter_dir), sparse=True),
    }
    for name, spec in specs.items():
        [choice] = engine.generate(spec, ids, greedy)
        assert 1 <= choice.completion_tokens <= 6, name
    assert len(engine._models) == 2  # the base (with the adapter attached) and the sparse merge
    for loaded in engine._models.values():
        weights = [p for n, p in loaded.model.named_parameters() if "lora_" not in n]
        assert {p.device.type for p in weights} == {"cuda"}
        assert {p.dtype for p in weights} == {torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    engine.shutdown()


def test_an_evaluation_scores_on_the_gpu_as_on_the_cpu(trained):
    model_dir, adapter_dir, data = trained
    candidates = [
        EvalCandidate(name="base", model=str(model_dir)),
        EvalCandidate(name="ft", model=str(model_dir), adapter=str(adapter_dir), data_format="alpaca"),
    ]
    params = EvaluateParams(candidates=candidates, data_path=str(data), max_samples=8, max_new_tokens=4)
    sink = MemorySink()
    rows = run_evaluation(params, sink, None)
    assert sum("(on cuda:0)" in text for _, text, _ in sink.messages) == 2
    assert all(len(row["samples"]) > 0 for row in rows)

    from peft import PeftModel

    from sqft_service.training.records import load_records

    records = load_records(str(data))
    tokenizer = load_tokenizer(str(model_dir))
    base = load_base_model(str(model_dir)).eval().requires_grad_(False)
    cpu = {"base": _scores(base, tokenizer, records, candidates[0])}
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    cpu["ft"] = _scores(with_adapter, tokenizer, records, candidates[1])
    for row in rows:
        assert row["loss"] == pytest.approx(cpu[row["candidate"]]["loss"], rel=1e-3), row["candidate"]
    assert rows[0]["loss"] != pytest.approx(rows[1]["loss"], rel=1e-3)  # the adapter is on
