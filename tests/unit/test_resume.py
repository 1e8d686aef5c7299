"""Exact resume: a run stopped part-way and resumed from its checkpoint equals the run never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from sqft_service.adapters.nls import STATS_FILE
from sqft_service.config import LoraSection
from sqft_service.training.events import MemorySink
from sqft_service.training.recipe import TrainingStopped, run_training
from sqft_service.training.resume import latest_resume_point
from sqft_service.workspace import TrainingOutputs
from tests.unit.test_recipe import NLS_GROUPS, losses, make_cfg, model_dir, train_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LORAS = {
    # Dropout draws from torch's RNG every step: resume must restore it to get the same masks.
    "lora_dropout": LoraSection(r=4, lora_alpha=8, lora_dropout=0.1),
    "nls": LoraSection(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        neural_lora_search=True,
        target_module_groups=NLS_GROUPS,
        search_space=["4,2", "4,3,2", "4,1"],
    ),
}


class StopAt:
    """should_stop that answers True once ``step`` optimizer steps have run (counted from the metrics)."""

    def __init__(self, sink: MemorySink, step: int) -> None:
        self.sink, self.step = sink, step

    def __call__(self) -> bool:
        return len(losses(self.sink)) >= self.step


@pytest.mark.parametrize("lora", sorted(LORAS))
@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch, and exactly at the epoch boundary (8 steps/epoch)
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(model_dir, train_file, tmp_path, lora, stop_at):  # noqa: F811
    def cfg():
        return make_cfg(model_dir, train_file, lora=LORAS[lora], epochs=2)

    whole = MemorySink()
    full = run_training(cfg(), tmp_path / "whole", whole)

    first = MemorySink()
    with pytest.raises(TrainingStopped):
        run_training(cfg(), tmp_path / "split", first, should_stop=StopAt(first, stop_at))
    assert latest_resume_point(TrainingOutputs(tmp_path / "split"))[1] == stop_at
    second = MemorySink()
    resumed = run_training(cfg(), tmp_path / "split", second)

    assert any(f"resuming from step {stop_at}" in text for _, text, _ in second.messages)
    assert losses(first) + losses(second) == losses(whole)  # bit-equal, step by step
    assert resumed.steps == full.steps == 16
    assert resumed.trained_tokens == full.trained_tokens  # counted once
    a = load_file(str(Path(full.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    if lora == "nls":  # the search statistics (draws, loss per rank) continue rather than restart
        stats = [(Path(r.adapter_dir) / STATS_FILE).read_text() for r in (full, resumed)]
        assert stats[0] == stats[1]
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 16  # header + every step once, across both runs


def test_rolling_resume_state_is_written_and_is_the_latest_point(model_dir, train_file, tmp_path):  # noqa: F811
    sink = MemorySink()
    run_training(make_cfg(model_dir, train_file, epochs=1), tmp_path, sink, resume_every_s=0.0)
    outputs = TrainingOutputs(tmp_path)
    assert latest_resume_point(outputs) == (outputs.resume_state, 8)
    assert not sink.checkpoints[:-1]  # the rolling state is not a listed checkpoint (only the final adapter)
    assert not list(tmp_path.glob(".*.staging")) and not list(tmp_path.glob(".*.old"))
