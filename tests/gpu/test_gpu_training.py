"""Every method on CUDA as on the CPU: LoRA, NLS, SparsePEFT train, save, merge and prune on the GPU.

A tiny Llama trains a few steps on the GPU and on the CPU from the same weights and data; the losses
agree (fp32 both, so only the kernels' summation order differs). What a GPU job saves opens on the
CPU with stock peft; a sparse merge keeps every zero; Wanda calibrates on the GPU; and between
logging points the training step never makes the host wait for the device (DPO jobs too); GPTQ
quantizes on the GPU to weights that round alike on the CPU; a vision fine-tune trains on the GPU.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.training.events import MemorySink
from sqft_service.training.hooks import StepHook
from sqft_service.training.recipe import FinetuneRecipe, run_training
from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, preference_records, write_json

NLS_GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]
METHODS = {
    "lora": dict(r=8, lora_alpha=16, lora_dropout=0.0),
    "nls": dict(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        neural_lora_search=True,
        target_module_groups=NLS_GROUPS,
        search_space=["8,6,4", "8,4", "8,2"],
    ),
    "sparsepeft": dict(r=8, lora_alpha=16, lora_dropout=0.0, sparse_adapter=True),
    "qa_sparsepeft": dict(
        r=8, lora_alpha=16, lora_dropout=0.0, sparse_adapter=True, quantization_aware=True, quantization_group_size=32
    ),
}
SPARSE_BASE = {"sparsepeft", "qa_sparsepeft"}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_records(48))


def _model_dir(root: Path, tokenizer_dir: Path, sparse: bool) -> Path:
    from transformers import AutoTokenizer

    from sqft_service.adapters.sparsify import sparsify_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(len(tokenizer), initializer_range=0.3, hidden_size=64, intermediate_size=128)
    if sparse:
        sparsify_model(model, "magnitude", 0.5)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, gpu_tokenizer_dir) -> dict[bool, Path]:
    return {
        sparse: _model_dir(tmp_path_factory.mktemp(f"tiny-{sparse}"), gpu_tokenizer_dir, sparse)
        for sparse in (False, True)
    }


def _cfg(model_dir: Path, train_file: Path, method: str, device: str, **training) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = str(model_dir)
    cfg.General.lora_config = LoraSection(**METHODS[method])
    cfg.Dataset.train_file = str(train_file)
    cfg.Dataset.validation_split_percentage = 0
    t = cfg.Training
    t.batch_size, t.learning_rate, t.lr_scheduler, t.seed, t.logging_steps = 4, 1e-2, "constant", 7, 1
    t.max_train_steps, t.device, t.mixed_precision = 6, device, "no"
    for key, value in training.items():
        setattr(t, key, value)
    return cfg


def _losses(sink: MemorySink) -> list[float]:
    return [row["train_loss"] for row in sink.metric_rows if "train_loss" in row]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_on_cuda_as_on_the_cpu(model_dirs, train_file, tmp_path, method):
    model_dir = model_dirs[method in SPARSE_BASE]
    runs = {}
    for device in ("cpu", "cuda"):
        sink = MemorySink()
        recipe = FinetuneRecipe(_cfg(model_dir, train_file, method, device), tmp_path / device, sink)
        recipe.setup()
        assert {p.device.type for p in recipe.model.parameters()} == {device}
        try:
            recipe.train()
            nls = recipe.handles.nls.stats()["dimensions"] if recipe.handles.nls is not None else None
        finally:
            recipe.cleanup()
        runs[device] = (_losses(sink), nls, sink)
    cpu, cuda = runs["cpu"], runs["cuda"]
    assert len(cuda[0]) == 6 and cuda[0][-1] < cuda[0][0]
    torch.testing.assert_close(torch.tensor(cuda[0]), torch.tensor(cpu[0]), rtol=5e-3, atol=5e-3)
    if method == "nls":  # the same sub-adapters drawn, the same statistics kept
        assert [[d["ranks"][r]["draws"] for r in d["ranks"]] for d in cuda[1]] == [
            [d["ranks"][r]["draws"] for r in d["ranks"]] for d in cpu[1]
        ]
    placed = next(d for _, _, d in cuda[2].messages if d and "device" in d)
    assert placed["device"].startswith("cuda") and placed["device_name"] == torch.cuda.get_device_name()


def test_auto_precision_on_the_gpu_is_bf16_with_a_bf16_frozen_base(model_dirs, train_file, tmp_path):
    cfg = _cfg(model_dirs[False], train_file, "lora", "auto", mixed_precision="auto")
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, tmp_path, sink)
    recipe.setup()
    assert recipe.device.type == "cuda"
    assert recipe.autocast_dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    base = recipe.model.get_base_model().model.layers[0].mlp.gate_proj.weight
    assert base.dtype == (recipe.autocast_dtype or torch.float32)
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters() if p.requires_grad)
    recipe.train()
    assert all(torch.isfinite(torch.tensor(_losses(sink))))


def test_what_a_gpu_job_saves_opens_on_the_cpu_with_stock_peft(model_dirs, train_file, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg(model_dirs[False], train_file, "nls", "cuda")
    cfg.General.save_strategy, cfg.General.save_steps = "steps", 3
    recipe = FinetuneRecipe(cfg, tmp_path, MemorySink())
    recipe.setup()
    try:
        recipe.train()
        trained = {n: p.detach().cpu() for n, p in recipe.model.named_parameters() if p.requires_grad}
    finally:
        recipe.cleanup()
    # Optimizer state and NLS statistics as CPU tensors (torch.load restores tensors where they were saved).
    state = torch.load(tmp_path / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)
    tensors = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, (list, tuple)):
            [walk(v) for v in value]

    walk(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    base = AutoModelForCausalLM.from_pretrained(model_dirs[False], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(t.device.type == "cpu" for t in saved.values())
    got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    for name, value in trained.items():
        torch.testing.assert_close(got[name], value, msg=name)


def test_sparse_job_merged_on_the_gpu_keeps_every_zero(model_dirs, train_file, tmp_path):
    from safetensors.torch import load_file

    from sqft_service.model_ops import merge

    run_training(_cfg(model_dirs[True], train_file, "sparsepeft", "cuda"), tmp_path / "job", MemorySink())
    result = merge(str(model_dirs[True]), tmp_path / "job" / "adapter", tmp_path / "merged", sparse=True)
    assert result["zeros_preserved"] is True
    before = load_file(str(model_dirs[True] / "model.safetensors"))
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    changed = 0
    for name, weight in before.items():
        if "layers." in name and name.endswith("proj.weight"):
            assert bool((after[name][weight == 0] == 0).all()), name
            changed += int(not torch.equal(after[name], weight))
    assert changed > 0  # the adapter did move the merged weights


def test_wanda_calibrates_on_the_gpu(model_dirs, tmp_path):
    from sqft_service.model_ops import sparsify

    result = sparsify(str(model_dirs[False]), tmp_path / "wanda", method="wanda", sparsity=0.5)
    assert result["device"] == "cuda"
    assert abs(result["report"]["overall"] - 0.5) < 0.02
    assert json.loads((tmp_path / "wanda" / "sparsity_report.json").read_text())["method"] == "wanda"


def test_gptq_quantizes_on_the_gpu_to_weights_that_its_file_rounds_to_on_the_cpu(model_dirs, tmp_path):
    from sqft_service.adapters.qa import quantized_base_of
    from sqft_service.model_ops import sparsify
    from sqft_service.training.models import load_base_model

    quantization = {"method": "gptq", "bits": 4, "group_size": 32}
    result = sparsify(str(model_dirs[False]), tmp_path / "gptq", method="wanda", quantization=quantization)
    assert result["device"] == "cuda"
    assert result["quantization"]["output_error"] < result["quantization"]["rtn_output_error"]
    base = load_base_model(str(tmp_path / "gptq"))  # on the CPU: the INT export and merges round here
    gptq = quantized_base_of(base)
    layers = [(name, m) for name, m in base.named_modules() if name in gptq]
    assert len(layers) == 7 * base.config.num_hidden_layers
    for name, module in layers:
        rounded = gptq.quantizer(name).fake_quantize(gptq.float_weight(name))
        assert torch.equal(rounded, module.weight), name


class SyncRecorder(StepHook):
    """Turns CUDA's sync debug mode on around the steps that are not logging points, and records syncs."""

    def __init__(self, watched: set[int]) -> None:
        self.watched, self.syncs, self._catcher = watched, [], None

    def before_step(self, step: int) -> None:
        if step in self.watched:
            self._catcher = warnings.catch_warnings(record=True)
            self.caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def after_step(self, step: int, stats) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs += [f"step {step}: {w.message}" for w in self.caught if "synchroniz" in str(w.message)]
            self._catcher.__exit__(None, None, None)
            self._catcher = None


@pytest.mark.parametrize(
    ("method", "packing"), [*((m, False) for m in METHODS), ("lora", True)], ids=[*METHODS, "lora-packed"]
)
def test_steps_between_logging_points_never_wait_for_the_gpu(model_dirs, train_file, tmp_path, method, packing):
    """Packed batches included: their block mask comes from the host (training/device.py ``packed_mask_4d``)."""
    cfg = _cfg(model_dirs[method in SPARSE_BASE], train_file, method, "cuda", logging_steps=100, mixed_precision="auto")
    cfg.Dataset.packing = packing
    cfg.Training.max_train_steps = 8
    recorder = SyncRecorder(watched={3, 4, 5, 6})  # after warm-up, before the last (logged) step
    recipe = FinetuneRecipe(cfg, tmp_path, MemorySink(), step_hooks=[recorder])
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    assert recorder.syncs == []


def test_a_real_cuda_out_of_memory_is_retried_in_smaller_passes(model_dirs, train_file, tmp_path):
    # Any pass of more than 2 examples asks the CUDA caching allocator for 16 TiB: a real
    # torch.OutOfMemoryError mid-forward. The job goes on in passes of 2, with the same losses.
    runs = {}
    for name, holds in (("fits", None), ("tight", 2)):
        sink = MemorySink()
        recipe = FinetuneRecipe(_cfg(model_dirs[False], train_file, "lora", "cuda"), tmp_path / name, sink)
        recipe.setup()

        def limit(_module, args, holds=holds):
            if holds is not None and args[0].shape[0] > holds:
                torch.empty(2**44, dtype=torch.uint8, device="cuda")

        recipe.model.get_base_model().model.layers[-1].register_forward_pre_hook(limit)
        try:
            recipe.train()
        finally:
            recipe.cleanup()
        runs[name] = sink
    warned = [text for level, text, _ in runs["tight"].messages if level == "warn"]
    assert len(warned) == 1 and "out of memory in step 1 with 4 example(s) per pass" in warned[0], warned
    torch.testing.assert_close(_losses(runs["tight"]), _losses(runs["fits"]), rtol=1e-4, atol=1e-5)
    peaks = [row["gpu_peak_memory_gib"] for row in runs["fits"].metric_rows if "train_loss" in row]
    assert peaks and all(0 < p < torch.cuda.get_device_properties(0).total_memory / 2**30 for p in peaks)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("pairs") / "pairs.json", preference_records(32))


def run_dpo(model_dir: Path, pairs_file: Path, out: Path, device: str, packing: bool, hooks=()) -> list[float]:
    """A DPO job's every step loss (read after training: a GPU job reads them at logging points only)."""
    cfg = _cfg(model_dir, pairs_file, "lora", device, logging_steps=100)
    cfg.Training.method, cfg.Training.dpo_beta, cfg.Dataset.packing = "dpo", 0.5, packing
    cfg.Training.learning_rate = 3e-3  # a smooth curve: CPU and GPU rounding then stay apart by little
    recipe = FinetuneRecipe(cfg, out, MemorySink(), step_hooks=list(hooks))
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return [row["train_loss"] for row in recipe._metric_rows]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dpo_trains_on_cuda_as_on_the_cpu_and_never_waits_between_logging_points(
    model_dirs, pairs_file, tmp_path, packing
):
    cpu = run_dpo(model_dirs[False], pairs_file, tmp_path / "cpu", "cpu", packing)
    recorder = SyncRecorder(watched={3, 4, 5})  # the reference pass is before step 1; step 6 is logged
    cuda = run_dpo(model_dirs[False], pairs_file, tmp_path / "cuda", "cuda", packing, [recorder])
    assert len(cuda) == 6 and abs(cuda[0] - math.log(2)) < 1e-3  # the policy starts as the reference
    torch.testing.assert_close(torch.tensor(cuda), torch.tensor(cpu), rtol=5e-3, atol=5e-3)
    assert recorder.syncs == []


@pytest.mark.parametrize("method", ["lora", "sparsepeft"])
def test_a_reinforcement_job_samples_and_trains_on_cuda(model_dirs, tmp_path, method):
    from safetensors.torch import load_file

    from sqft_service.training.rl_recipe import ReinforcementRecipe
    from tests.helpers import write_jsonl
    from tests.unit.test_reinforcement import SIMILARITY, prompt_records

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(16))
    cfg = _cfg(model_dirs[method in SPARSE_BASE], prompts, method, "cuda")
    cfg.Training.method, cfg.Training.rl_grader, cfg.Training.rl_max_tokens = "reinforcement", SIMILARITY, 8
    cfg.Training.eval_steps = 3
    cfg.Dataset.validation_split_percentage, cfg.Dataset.max_length = 25, 64
    sink = MemorySink()
    recipe = ReinforcementRecipe(cfg, tmp_path / "out", sink)
    recipe.setup()
    try:
        assert next(recipe.model.parameters()).device.type == "cuda"
        result = recipe.train()
    finally:
        recipe.cleanup()
    rewards = [r["train_reward_mean"] for r in sink.metric_rows if "train_reward_mean" in r]
    valid = [r["valid_reward_mean"] for r in sink.metric_rows if "valid_reward_mean" in r]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards) and valid
    weights = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_a_vision_fine_tune_trains_on_cuda_as_on_the_cpu_and_loads_there(gpu_tokenizer_dir, tmp_path):
    """Image records (training/images.py): the batch's pixels go to the GPU with it; the losses agree with
    a CPU run's, and the adapter opens on the CPU with stock peft."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    from tests.helpers import write_jsonl
    from tests.image_text import colour_records, save_image_text_model

    vlm = save_image_text_model(tmp_path / "tiny-vlm", gpu_tokenizer_dir)
    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(16))
    curves = {}
    for device in ("cpu", "cuda"):
        sink = MemorySink()
        run_training(_cfg(vlm, train, "lora", device, epochs=1), tmp_path / device, sink)
        curves[device] = _losses(sink)
    assert len(curves["cuda"]) == 4 and curves["cuda"][-1] < curves["cuda"][0]
    torch.testing.assert_close(torch.tensor(curves["cuda"]), torch.tensor(curves["cpu"]), rtol=5e-3, atol=5e-3)
    base = Gemma3ForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "cuda" / "adapter"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
