"""The training recipe end to end on a tiny saved model: learning, accumulation, checkpoints, NLS, SparsePEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench.tiny_llama import make_tiny_causal_lm

from sqft_service.adapters.nls import ELASTIC_CONFIG_FILE, STATS_FILE
from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.training.events import MemorySink
from sqft_service.training.recipe import FinetuneRecipe, run_training
from sqft_service.training.resume import saved_step
from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, write_json

NLS_GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]


def sqft_lora(groups: list[list[str]] = NLS_GROUPS, group_size: int = 8) -> LoraSection:
    """Every SQFT method at once: an NLS super-adapter, SparsePEFT, QA-SparsePEFT (INT4, groups of 8)."""
    return LoraSection(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        sparse_adapter=True,
        quantization_aware=True,
        quantization_group_size=group_size,
        neural_lora_search=True,
        target_module_groups=groups,
        search_space=["4,2", "4,3", "4,2"],
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_records(32))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama + the SmolLM2 tokenizer; a larger init scale lets LoRA move its logits."""
    out = tmp_path_factory.mktemp("tiny-llama-learnable")
    make_tiny_llama(len(tokenizer), initializer_range=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory, tokenizer) -> Path:
    from sqft_service.adapters.sparsify import sparsify_model

    out = tmp_path_factory.mktemp("tiny-sparse-llama")
    model = make_tiny_llama(len(tokenizer), initializer_range=0.3)
    sparsify_model(model, "magnitude", 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_cfg(model_dir: Path, train_file: Path, *, lora: LoraSection | None = None, **training) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = str(model_dir)
    cfg.General.lora_config = lora or LoraSection(r=4, lora_alpha=8, lora_dropout=0.0)
    cfg.Dataset.train_file = str(train_file)
    cfg.Dataset.validation_split_percentage = 0
    t = cfg.Training
    t.batch_size, t.learning_rate, t.lr_scheduler, t.seed, t.logging_steps = 4, 1e-2, "constant", 7, 1
    # fp32: these tests compare updates exactly; "auto" would pick bf16 on a CPU with AVX512-BF16.
    t.mixed_precision = "no"
    for key, value in training.items():
        setattr(t, key, value)
    return cfg


def losses(sink: MemorySink) -> list[float]:
    return [row["train_loss"] for row in sink.metric_rows if "train_loss" in row]


def test_loss_falls_on_a_repetitive_dataset(model_dir, train_file, tmp_path):
    sink = MemorySink()
    result = run_training(make_cfg(model_dir, train_file, epochs=3), tmp_path, sink)
    curve = losses(sink)
    assert result.steps == 24 and len(curve) == 24
    assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:4]) / 4, curve
    assert sink.trained_tokens == result.trained_tokens > 0
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert sink.checkpoints[-1][2]["final"] is True


def _first_update(
    model_dir: Path, train_file: Path, out: Path, batch_size: int, accum: int, packing: bool = False
) -> dict[str, torch.Tensor]:
    cfg = make_cfg(
        model_dir,
        train_file,
        batch_size=batch_size,
        gradient_accumulation_steps=accum,
        max_train_steps=1,
        optimizer="sgd",  # Adam's first step is ~lr*sign(g): it would hide a wrongly scaled gradient
        learning_rate=0.5,
        max_grad_norm=None,
    )
    cfg.Dataset.group_by_length = False  # the same example order for both batch sizes
    cfg.Dataset.packing = packing
    recipe = FinetuneRecipe(cfg, out, MemorySink())
    recipe.setup()
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    recipe.train()
    return {n: p.detach() - before[n] for n, p in recipe.model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_matches_one_big_batch(model_dir, train_file, tmp_path):
    big = _first_update(model_dir, train_file, tmp_path / "big", batch_size=4, accum=1)
    accumulated = _first_update(model_dir, train_file, tmp_path / "acc", batch_size=2, accum=2)
    assert any(float(d.abs().max()) > 0 for d in big.values())
    for name, delta in big.items():
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-7, msg=name)


def test_packing_gives_the_same_update(model_dir, train_file, tmp_path):
    plain = _first_update(model_dir, train_file, tmp_path / "plain", batch_size=4, accum=1)
    packed = _first_update(model_dir, train_file, tmp_path / "packed", batch_size=4, accum=1, packing=True)
    assert any(float(d.abs().max()) > 0 for d in plain.values())
    for name, delta in plain.items():
        torch.testing.assert_close(packed[name], delta, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("strategy", "training", "expected", "final"),
    [("steps", {"max_train_steps": 5}, [2, 4], 5), ("epoch", {"epochs": 2, "batch_size": 8}, [4, 8], 8)],
)
def test_checkpoints_follow_save_strategy(model_dir, train_file, tmp_path, strategy, training, expected, final):
    cfg = make_cfg(model_dir, train_file, **training)
    cfg.General.save_strategy = strategy
    cfg.General.save_steps = 2
    sink = MemorySink()
    run_training(cfg, tmp_path, sink)
    written = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert written == expected
    for step in expected:
        ckpt = tmp_path / "checkpoints" / f"step-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
        assert saved_step(ckpt) == step  # resumable: adapter + trainer state of that step
    assert [c[0] for c in sink.checkpoints] == [*expected, final]  # then the final adapter


def test_no_checkpoints_by_default(model_dir, train_file, tmp_path):
    run_training(make_cfg(model_dir, train_file, max_train_steps=2), tmp_path, MemorySink())
    assert not (tmp_path / "checkpoints").exists()


def test_nls_job_writes_search_files(model_dir, train_file, tmp_path):
    lora = LoraSection(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        neural_lora_search=True,
        target_module_groups=NLS_GROUPS,
        search_space=["4,3,2", "4,3,2", "4,3,2"],
    )
    sink = MemorySink()
    result = run_training(make_cfg(model_dir, train_file, lora=lora, max_train_steps=6), tmp_path, sink)
    adapter = Path(result.adapter_dir)
    elastic = json.loads((adapter / ELASTIC_CONFIG_FILE).read_text())
    stats = json.loads((adapter / STATS_FILE).read_text())
    assert elastic and stats["n_dimensions"] == 2 * len(NLS_GROUPS)  # 2 layers x 3 groups
    draws = [sum(r["draws"] for r in d["ranks"].values()) for d in stats["dimensions"]]
    assert draws == [6] * stats["n_dimensions"]
    assert any("nls_stats" in row for row in sink.metric_rows)
    assert all(torch.isfinite(torch.tensor(losses(sink))))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sparse_peft_job_keeps_the_base_zeros(sparse_model_dir, train_file, tmp_path, dropout):
    from safetensors.torch import load_file

    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=dropout, sparse_adapter=True)
    cfg = make_cfg(sparse_model_dir, train_file, lora=lora, max_train_steps=4)
    recipe = FinetuneRecipe(cfg, tmp_path, MemorySink())
    recipe.setup()
    try:
        assert recipe.handles.sparse is not None
        recipe.train()
        # The merged delta of every adapted layer is zero wherever the base weight is zero.
        for module in recipe.handles.sparse.modules.values():
            base = module.get_base_layer().weight
            delta = module.get_delta_weight("default")
            assert float(delta.abs().sum()) > 0
            assert float(delta[base == 0].abs().max()) == 0.0
    finally:
        recipe.cleanup()
    assert load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_bf16_falls_back_to_fp32_without_native_support(model_dir, train_file, tmp_path, monkeypatch, native, expected):
    from sqft_service.training import precision

    monkeypatch.setattr(precision, "native_bf16_supported", lambda: native)
    sink = MemorySink()
    recipe = FinetuneRecipe(make_cfg(model_dir, train_file, mixed_precision="bf16", max_train_steps=1), tmp_path, sink)
    recipe.setup()
    assert recipe.autocast_dtype is expected
    warned = [text for level, text, _ in sink.messages if level == "warn" and "bf16" in text]
    assert bool(warned) is (not native)
    base_dtype = recipe.model.get_base_model().model.layers[0].mlp.gate_proj.weight.dtype
    assert base_dtype == (torch.bfloat16 if native else torch.float32)  # the frozen base follows autocast
    recipe.train()
    assert all(torch.isfinite(torch.tensor(losses(sink))))


def test_thread_count_follows_the_config(model_dir, train_file, tmp_path):
    recipe = FinetuneRecipe(make_cfg(model_dir, train_file, num_threads=1, max_train_steps=1), tmp_path, MemorySink())
    recipe.setup()
    assert torch.get_num_threads() == 1


def test_step_hooks_run_once_per_optimizer_step(model_dir, train_file, tmp_path):
    import math

    from sqft_service.training.hooks import StepHook, StepStats

    calls: list[tuple[str, int]] = []
    stats: list[StepStats] = []

    class Recorder(StepHook):
        def before_step(self, step: int) -> None:
            calls.append(("before", step))

        def after_step(self, step: int, step_stats: StepStats) -> None:
            calls.append(("after", step))
            stats.append(step_stats)

    sink = MemorySink()
    cfg = make_cfg(model_dir, train_file, batch_size=2, gradient_accumulation_steps=2, max_train_steps=3)
    recipe = FinetuneRecipe(cfg, tmp_path, sink, step_hooks=[Recorder()])
    recipe.setup()
    result = recipe.train()
    assert calls == [(kind, step) for step in (1, 2, 3) for kind in ("before", "after")]
    assert [s.step for s in stats] == [1, 2, 3] and all(s.epoch == 0 for s in stats)
    assert sum(s.real_tokens for s in stats) == result.trained_tokens > 0
    for s in stats:
        assert 0 < s.label_tokens < s.real_tokens <= s.padded_tokens
        assert 0 < s.seconds < 60 and math.isfinite(s.loss) and s.loss > 0
    assert [round(s.loss, 6) for s in stats] == losses(sink)  # the loss the metrics report


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3", "phi3", "olmo2"])
def test_other_families_train_with_every_sqft_method(kind, tokenizer, train_file, tmp_path):
    """The recipe knows no architecture: a pruned Mistral, Qwen2 (biases on q/k/v), Qwen3 (q/k norms), Gemma 2
    (soft-capped logits), Gemma 3 (sliding layers, four norms a layer, scaled embeddings), SmolLM3 (rope-less
    layers), Phi-3 (fused q/k/v and gate/up projections, adapted by default) or OLMo 2 (norms after the blocks)
    trains an NLS, SparsePEFT, QA-SparsePEFT adapter whose loss falls, and merges to an INT model as sparse as
    its base, exported to GGUF with every QA layer as the integers it trained with (GGML decodes them to the
    merged weights bit for bit)."""
    from sqft_service.adapters.sparsify import sparsify_model
    from sqft_service.model_ops import merge

    # 32 inputs to a quantization group: one GGML block, so the GGUF holds the QA layers as Q4_1 blocks.
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, initializer_range=0.3)
    if kind == "gemma2":  # llama.cpp's Gemma 2 reads its head from the embedding: a GGUF export needs it tied
        shape["tie_word_embeddings"] = True
    model = make_tiny_causal_lm(kind, len(tokenizer), **shape).train()
    sparsify_model(model, "magnitude", 0.5)
    base = tmp_path / kind
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    sink = MemorySink()
    groups = [["qkv_proj"], ["gate_up_proj"], ["down_proj"]] if kind == "phi3" else NLS_GROUPS
    cfg = make_cfg(base, train_file, lora=sqft_lora(groups, group_size=32), epochs=2)
    result = run_training(cfg, tmp_path / "out", sink)
    curve = losses(sink)
    assert sum(curve[-3:]) < sum(curve[:3]), curve
    report = merge(str(base), Path(result.adapter_dir), tmp_path / "merged", sparse=True, gguf_type="f16")
    assert report["zeros_preserved"] is True and report["quantization"]["bits"] == 4
    exported = report["gguf"]
    assert exported["int_layers"] == exported["exact_int_layers"] == report["adapted_modules"] > 0, exported
    assert exported["tensor_types"]["Q4_1"] == exported["int_layers"], exported
