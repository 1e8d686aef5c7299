"""A step that runs out of device memory is retried in more passes, with the same update (training/memory.py).

CUDA's allocator raises ``torch.OutOfMemoryError``; this CPU machine has no such limit, so a forward
pre-hook on the last decoder layer raises it (mid-forward, with the first layers' activations and
graph built) whenever a pass holds more examples than a simulated device holds. The recovery under
test is the recipe's own: the job goes on in smaller passes, and its losses and adapter are those of
a run that never ran out of memory. ``tests/gpu/test_gpu_training.py`` does the same with the real
CUDA allocator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.training.events import MemorySink
from sqft_service.training.hooks import StepStats
from sqft_service.training.memory import DeviceOutOfMemory, split_shard
from sqft_service.training.recipe import FinetuneRecipe
from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, write_json

pytestmark = pytest.mark.usefixtures("one_thread")

NLS = dict(
    neural_lora_search=True,
    target_module_groups=[["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
    search_space=["4,2", "4,2", "4,2"],
)


def test_a_shard_splits_into_near_equal_consecutive_runs():
    assert split_shard([1, 2, 3, 4, 5, 6, 7, 8], 2) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert split_shard([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_shard([1, 2, 3], 4) == [[1], [2], [3]]  # never an empty pass
    assert split_shard([], 2) == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("oom")
    make_tiny_llama(len(tokenizer), initializer_range=0.3).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", write_json(root / "train.json", alpaca_records(48))


def _cfg(model_dir: Path, train_file: Path, validation: float = 0, **lora) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.General.base_model = str(model_dir)
    cfg.General.lora_config = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, **lora)
    cfg.Dataset.train_file = str(train_file)
    cfg.Dataset.validation_split_percentage = validation
    t = cfg.Training
    t.batch_size, t.gradient_accumulation_steps, t.learning_rate, t.seed = 8, 2, 1e-2, 3
    t.max_train_steps, t.logging_steps, t.device, t.mixed_precision = 3, 1, "cpu", "no"
    return cfg


def _run(
    cfg: FinetuneConfig, out: Path, holds: int | None, fail_once_at: int | None = None
) -> tuple[MemorySink, FinetuneRecipe]:
    """Train; with ``holds``, a pass of more examples than that raises ``torch.OutOfMemoryError``; with
    ``fail_once_at``, the pass of that number raises it once (after earlier passes' backward)."""
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, out, sink)
    recipe.setup()
    passes: list[int] = []
    elements: list[int] = []  # each pass's input tensor elements (rows times length)
    stats: list[StepStats] = []

    class Record:
        def before_step(self, step):
            pass

        def after_step(self, step, s):
            stats.append(s)

    recipe.step_hooks.append(Record())

    def device_limit(_module, args):
        rows = args[0].shape[0]
        passes.append(rows)
        elements.append(rows * args[0].shape[1])
        if (holds is not None and rows > holds) or len(passes) == fail_once_at:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} GiB (simulated)")

    layers = recipe.model.get_base_model().model.layers
    layers[-1].register_forward_pre_hook(device_limit)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    recipe.passes, recipe.pass_elements, recipe.stats = passes, elements, stats
    return sink, recipe


def _losses(sink: MemorySink) -> list[float]:
    return [row["train_loss"] for row in sink.metric_rows if "train_loss" in row]


@pytest.mark.parametrize("method", ["lora", "nls"])
def test_out_of_memory_retries_the_step_in_smaller_passes_with_the_same_update(setup, tmp_path, method):
    model_dir, _ = setup
    # Answers of 1 to 12 words in unsorted batches: a split pass pads less than its whole batch did.
    records = [{**r, "output": " ".join([r["output"]] * (i % 12 + 1))} for i, r in enumerate(alpaca_records(48))]
    train_file = write_json(tmp_path / "varied.json", records)
    cfgs = [_cfg(model_dir, train_file, **(NLS if method == "nls" else {})) for _ in range(2)]
    for cfg in cfgs:
        cfg.Dataset.group_by_length = False
    want, _ = _run(cfgs[0], tmp_path / "fits", holds=None)
    got, recipe = _run(cfgs[1], tmp_path / "tight", holds=2)
    warnings = [text for level, text, _ in got.messages if level == "warn"]
    assert warnings == [
        "cpu out of memory in step 1 with 8 example(s) per pass: each micro-batch now runs in 2 passes of up to 4; "
        "the batch, loss and update are unchanged",
        "cpu out of memory in step 1 with 4 example(s) per pass: each micro-batch now runs in 4 passes of up to 2; "
        "the batch, loss and update are unchanged",
    ]
    assert recipe.forward_split.parts == 4
    assert max(recipe.passes[-8:]) == 2  # the later steps start in passes that fit
    # Step 1's padded-token count is that of the passes that ran it, not of the batches that did not fit.
    ran = recipe.pass_elements[-24:]  # 3 steps, 2 micro-batches, 4 passes each, none failed
    assert [s.padded_tokens for s in recipe.stats] == [sum(ran[i : i + 8]) for i in (0, 8, 16)]
    assert len(_losses(got)) == 3
    torch.testing.assert_close(_losses(got), _losses(want), rtol=1e-5, atol=0)
    tight = load_file(str(tmp_path / "tight" / "adapter" / "adapter_model.safetensors"))
    fits = load_file(str(tmp_path / "fits" / "adapter" / "adapter_model.safetensors"))
    assert tight.keys() == fits.keys()
    for key in fits:
        torch.testing.assert_close(tight[key], fits[key], rtol=1e-4, atol=1e-7, msg=key)


def test_out_of_memory_after_a_pass_of_the_step_ran_starts_the_step_again(setup, tmp_path):
    # The step's first micro-batch ran forward and backward; its second runs out of memory. Its
    # gradients so far are dropped and the whole step runs again in smaller passes.
    model_dir, train_file = setup
    want, _ = _run(_cfg(model_dir, train_file), tmp_path / "fits", holds=None)
    got, recipe = _run(_cfg(model_dir, train_file), tmp_path / "once", holds=None, fail_once_at=2)
    assert recipe.forward_split.parts == 2 and recipe.passes[:3] == [8, 8, 4]
    torch.testing.assert_close(_losses(got), _losses(want), rtol=1e-5, atol=0)


def test_a_validation_pass_that_runs_out_of_memory_is_halved_with_the_same_figures(setup, tmp_path):
    model_dir, train_file = setup
    want, _ = _run(_cfg(model_dir, train_file, validation=25), tmp_path / "fits", holds=None)
    got, recipe = _run(_cfg(model_dir, train_file, validation=25), tmp_path / "tight", holds=2)
    valid = [row["valid_loss"] for row in got.metric_rows if "valid_loss" in row]
    expected = [row["valid_loss"] for row in want.metric_rows if "valid_loss" in row]
    # Batches of 2 instead of 8: the same sum in another order, so equal to float rounding, not bit for bit.
    assert valid and len(valid) == len(expected)
    torch.testing.assert_close(valid, expected, rtol=1e-5, atol=1e-6)
    assert recipe.passes.count(8) >= 2  # training's and validation's batches of 8 both ran out first


def test_out_of_memory_with_one_example_per_pass_fails_naming_what_to_change(setup, tmp_path):
    model_dir, train_file = setup
    with pytest.raises(DeviceOutOfMemory) as err:
        _run(_cfg(model_dir, train_file), tmp_path / "never", holds=0)
    assert err.value.code == "out_of_memory"
    assert err.value.message.startswith("cpu out of memory in step 1 with one example per pass: set ")
    assert "`General.enable_gradient_checkpointing`" in err.value.message and "(simulated)" in err.value.message


def test_evaluation_batches_are_halved_until_they_fit_with_the_same_results():
    from sqft_service.training.memory import in_fitting_batches

    tried: list[int] = []

    def run(chunk):
        tried.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * x for x in chunk]

    got = in_fitting_batches(list(range(11)), 16, run, torch.device("cpu"))
    assert [x for part in got for x in part] == [x * x for x in range(11)]
    assert tried == [11, 8, 4, 2, 2, 2, 2, 2, 1]  # halved until it fits; the last batch is what is left

    def never(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(DeviceOutOfMemory, match="cpu out of memory with one example per batch"):
        in_fitting_batches([1, 2], 2, never, torch.device("cpu"))
