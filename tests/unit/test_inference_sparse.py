"""A SparsePEFT adapter at inference and in evaluation computes what was trained: ``W + M*(BA)``.

A tiny random Llama pruned to 50 %, an adapter built with the service's own training code
(``build_peft_model`` with ``sparse_adapter``) and non-zero B matrices, saved as a job saves it. The
engine's model must answer exactly as the trained model does in eval mode and as the sparse merge the
service writes, keep every zero of the base, and differ from what stock peft would serve (the
unmasked ``BA``), which is what would have been served without the mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sqft_service.adapters.lora import build_peft_model
from sqft_service.adapters.merge import merge_adapter
from sqft_service.adapters.sparsify import prunable_linears, sparsify_model
from sqft_service.config import LoraSection
from sqft_service.evaluation import run_evaluation, trained_sparse
from sqft_service.inference.engine import InferenceEngine
from sqft_service.inference.spec import ModelSpec, Sampling
from sqft_service.jobs.kinds import EvalCandidate, EvaluateParams
from sqft_service.training.events import MemorySink
from tests.conftest import make_tiny_llama, randomize_b
from tests.helpers import alpaca_records, write_json

IDS = [1, 50, 60, 70, 80, 90, 2, 100]


@pytest.fixture(scope="module")
def sparse_job(tmp_path_factory, tokenizer):
    """(sparse base dir, its SparsePEFT adapter dir, the trained PeftModel in eval mode, a plain adapter dir)."""
    root = tmp_path_factory.mktemp("sparse-inference")
    base = make_tiny_llama(len(tokenizer))
    sparsify_model(base, "magnitude", 0.5)
    base_dir = root / "sparse-base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    lora = LoraSection(r=4, lora_alpha=16, lora_dropout=0.0, sparse_adapter=True)
    trained, handles = build_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    assert handles.sparse is not None
    randomize_b(trained)
    adapter_dir = root / "adapter"
    trained.save_pretrained(adapter_dir)  # as FinetuneRecipe.save_adapter: PEFT format + the job's config
    (adapter_dir / "training_config.json").write_text(json.dumps({"General": {"lora_config": lora.model_dump()}}))

    plain, _ = build_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraSection(r=4, lora_dropout=0.0))
    randomize_b(plain, seed=2)
    plain_dir = root / "plain"
    plain.save_pretrained(plain_dir)
    return base_dir, adapter_dir, trained.eval(), plain_dir


def _engine() -> InferenceEngine:
    return InferenceEngine(threads=1, max_queue=0, max_models=3, model_cache_dir=None)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


def test_engine_serves_the_masked_update(sparse_job, tmp_path):
    base_dir, adapter_dir, trained, _ = sparse_job
    engine = _engine()
    spec = ModelSpec("ft:sparse", str(base_dir), adapter=str(adapter_dir), sparse=True)
    served, _, _ = engine._activate(spec)

    # What the trained model computes (SparseLoraLinear's fused eval forward), bit for bit.
    assert torch.equal(_logits(served), _logits(trained))
    # The service's own sparse merge (POST /v1/finetune/merge_adapter) answers alike.
    merge_adapter(base_dir, adapter_dir, tmp_path / "merged", sparse=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_logits(served), _logits(merged))
    # Stock peft would have served the unmasked BA: a different model.
    unmasked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    assert not torch.allclose(_logits(served), _logits(unmasked), atol=1e-3)

    # The served weights keep every zero of the pruned base, and the update did change the rest.
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    served_linears = prunable_linears(served)
    changed = 0
    for name, layer in prunable_linears(base).items():
        zeros = layer.weight == 0
        assert zeros.float().mean() == pytest.approx(0.5, abs=0.02), name
        assert torch.all(served_linears[name].weight[zeros] == 0), name
        changed += int(not torch.equal(served_linears[name].weight, layer.weight))
    assert changed == 14  # every adapted projection (7 per layer, 2 layers)

    # Greedy tokens through the engine's generate equal the merged model's greedy tokens.
    greedy = Sampling(max_tokens=10, temperature=0.0)
    (choice,) = engine.generate(spec, IDS, greedy)
    tokenizer = engine._tokenizers[str(base_dir)]
    with torch.inference_mode():
        reference = merged.generate(
            input_ids=torch.tensor([IDS]),
            attention_mask=torch.ones(1, len(IDS), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=sorted(InferenceEngine._eos_ids(merged, tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(IDS) :]
    assert choice.text and choice.text == tokenizer.decode(reference.tolist(), skip_special_tokens=True)


def test_a_sparse_adapter_leaves_the_shared_base_and_other_adapters_alone(sparse_job):
    base_dir, adapter_dir, trained, plain_dir = sparse_job
    engine = _engine()
    plain_spec = ModelSpec("ft:plain", str(base_dir), adapter=str(plain_dir))
    plain_before = _logits(engine._activate(plain_spec)[0]).clone()
    sparse_model = engine._activate(ModelSpec("ft:sparse", str(base_dir), adapter=str(adapter_dir), sparse=True))[0]
    assert torch.equal(_logits(sparse_model), _logits(trained))
    # The plain adapter is still stock peft on the shared base (unmasked), and the base is still the base.
    assert torch.equal(_logits(engine._activate(plain_spec)[0]), plain_before)
    base_model, _, context = engine._activate(ModelSpec("base", str(base_dir)))
    with context:
        assert torch.equal(_logits(base_model), _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval()))
    # Deleting the adapter drops its merged copy (and only models that use it).
    assert len(engine._models) == 2
    engine.forget(adapter_dir)
    assert list(engine._models) == [str(base_dir)]


def test_the_evaluate_job_scores_the_masked_model(sparse_job, tmp_path):
    base_dir, adapter_dir, _, _ = sparse_job
    assert trained_sparse(adapter_dir) and not trained_sparse(base_dir)
    merge_adapter(base_dir, adapter_dir, tmp_path / "merged", sparse=True, tokenizer_dir=base_dir)
    data = write_json(tmp_path / "eval.json", alpaca_records(6))
    candidates = [
        EvalCandidate(name="sparse", model=str(base_dir), adapter=str(adapter_dir), sparse=True, data_format="alpaca"),
        EvalCandidate(name="merged", model=str(tmp_path / "merged"), merged=True, data_format="alpaca"),
        EvalCandidate(name="unmasked", model=str(base_dir), adapter=str(adapter_dir), data_format="alpaca"),
    ]
    params = EvaluateParams(candidates=candidates, data_path=str(data), max_new_tokens=6)
    sparse, merged, unmasked = run_evaluation(params, MemorySink(), None)
    assert sparse["loss"] == merged["loss"] and sparse["samples"] == merged["samples"]
    assert sparse["loss"] != pytest.approx(unmasked["loss"], abs=1e-4)


def test_an_extracted_sub_adapter_carries_the_training_config(sparse_job, tmp_path):
    from sqft_service.adapters.nls.extract import extract_sub_adapter

    _, adapter_dir, _, _ = sparse_job
    src = tmp_path / "super"
    src.mkdir()
    for f in Path(adapter_dir).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    # One search dimension over no module: nothing to slice; what matters is the files beside it.
    (src / "elastic_adapter_config.json").write_text(
        json.dumps({"dimensions": [{"index": 0, "layer": 0, "group": 0, "modules": []}]})
    )
    extract_sub_adapter(src, tmp_path / "sub", [4])
    assert trained_sparse(tmp_path / "sub")
