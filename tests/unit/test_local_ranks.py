"""The subprocess runner's data-parallel launcher (jobs/local_ranks.py): threads, resources, joining."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sqft_service.errors import InvalidConfigurationError
from sqft_service.jobs import local_ranks
from sqft_service.training.distributed import RankLost


def test_only_fine_tunes_run_as_several_ranks():
    assert local_ranks.world_size_of({"kind": "fine_tune", "params": {"Training": {"num_training_workers": 3}}}) == 3
    assert local_ranks.world_size_of({"kind": "fine_tune", "params": {}}) == 1
    assert local_ranks.world_size_of({"kind": "merge", "params": {"Training": {"num_training_workers": 3}}}) == 1


def test_each_rank_gets_its_cpu_resource_or_a_share_of_the_jobs_threads(monkeypatch):
    monkeypatch.setenv("SQFT_NUM_THREADS", "8")
    assert local_ranks.rank_threads({}, 2) == 4
    assert local_ranks.rank_threads({}, 16) == 1  # never zero
    assert local_ranks.rank_threads({"resources_per_worker": {"CPU": 3}}, 2) == 3
    assert local_ranks.rank_threads({"resources_per_worker": {"CPU": 0.5}}, 2) == 1


def test_the_subprocess_runner_refuses_resources_it_cannot_place():
    local_ranks.check_local_resources({"resources_per_worker": {"CPU": 2}})
    local_ranks.check_local_resources({})
    for resources in ({"GPU": 1}, {"CPU": 1, "accelerator_type:A100": 1}):
        with pytest.raises(InvalidConfigurationError, match="Ray runner") as err:
            local_ranks.check_local_resources({"resources_per_worker": resources})
        assert err.value.param == "Training.resources_per_worker"


def test_a_rank_that_dies_before_joining_fails_the_start_at_once():
    store = local_ranks.open_store(2)
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RankLost, match="rank 1 exited with code 3 before it joined"):
        local_ranks.wait_for_ranks(store, [child])


def test_ranks_that_join_are_waited_for():
    store = local_ranks.open_store(2)
    code = (
        "import torch.distributed as d, sys; "
        f"s = d.TCPStore('127.0.0.1', {store.port}, 2, is_master=False); s.set('sqft/joined/1', '1')"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    local_ranks.wait_for_ranks(store, [child])
    assert child.wait(60) == 0


@pytest.mark.parametrize(
    ("device", "gpus", "world_size", "on_gpus"),
    [("cpu", 8, 2, False), ("auto", 0, 2, False), ("auto", 2, 2, True), ("cuda", 4, 3, True)],
)
def test_ranks_train_on_gpus_one_each_when_the_machine_has_enough(device, gpus, world_size, on_gpus):
    assert local_ranks.ranks_on_gpus({"device": device}, world_size, gpus) is on_gpus


@pytest.mark.parametrize(
    ("device", "gpus", "world_size", "param", "says"),
    [
        ("cuda", 0, 2, "Training.device", "no CUDA GPU"),
        ("auto", 1, 2, "Training.num_training_workers", "take one GPU each, and this machine has 1"),
        ("cuda", 2, 3, "Training.num_training_workers", "ask for at most 2 worker(s)"),
    ],
)
def test_fewer_gpus_than_ranks_fail_naming_the_field(device, gpus, world_size, param, says):
    with pytest.raises(InvalidConfigurationError) as err:
        local_ranks.ranks_on_gpus({"device": device}, world_size, gpus)
    assert err.value.param == param and says in err.value.message
