"""The subprocess runner hands each job process its own GPUs, least busy first (jobs/gpus.py).

This machine has no GPU, so the runner is given two GPU ids to hand out; the job processes are real
ones, and what they see is the ``CUDA_VISIBLE_DEVICES`` they print.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from sqft_service.jobs.gpus import GpuPool, gpus_wanted
from sqft_service.jobs.runner import LaunchSpec
from sqft_service.jobs.subprocess_runner import SubprocessRunner


def test_the_least_busy_gpus_are_taken_and_given_back():
    pool = GpuPool(["0", "1", "2"])
    assert pool.take("a", 1) == ["0"]
    assert pool.take("b", 2) == ["1", "2"]
    assert pool.take("c", 1) == ["0"]  # every GPU busy: the least busy, lowest first, is shared
    pool.release("a")
    assert pool.take("d", 2) == ["0", "1"]  # one job on each GPU now: the lowest two
    assert pool.take("e", 5) == ["0", "1", "2"]  # never more than there are, each once
    assert GpuPool([]).take("a", 2) == [] and GpuPool(["7"]).take("a", 0) == []


@pytest.mark.parametrize(
    ("kind", "config", "wanted"),
    [
        ("fine_tune", {"Training": {"device": "auto", "num_training_workers": 3}}, 3),
        ("fine_tune", {"Training": {"device": "cuda"}}, 1),
        ("fine_tune", {"Training": {"device": "cpu", "num_training_workers": 2}}, 0),
        ("merge", {}, 1),
        ("sparsify", {}, 1),
        ("evaluate", {}, 1),
        ("extract", {}, 0),
    ],
)
def test_what_each_job_may_use(kind, config, wanted):
    assert gpus_wanted(kind, config) == wanted


def _spec(tmp_path: Path, name: str, gpus: int, seconds: float = 0.0) -> LaunchSpec:
    code = f"import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); time.sleep({seconds})"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return LaunchSpec(name, [sys.executable, "-c", code], env, tmp_path / f"{name}.log", tmp_path, gpus=gpus)


def _seen(runner: SubprocessRunner, handle, spec: LaunchSpec) -> str:
    deadline = time.monotonic() + 60
    while runner.poll(handle) is None:
        assert time.monotonic() < deadline, f"{spec.job_id} did not end"
        time.sleep(0.02)
    return spec.log_path.read_text().strip()


def test_concurrent_job_processes_see_their_own_gpus(tmp_path):
    runner = SubprocessRunner(gpu_ids=["0", "1"])
    a, b = _spec(tmp_path, "a", 1, seconds=30), _spec(tmp_path, "b", 1)
    ha, hb = runner.submit(a), runner.submit(b)
    assert _seen(runner, hb, b) == "1"  # a holds GPU 0 while it runs
    two = _spec(tmp_path, "two", 2)
    assert _seen(runner, runner.submit(two), two) == "0,1"  # a data-parallel job: one GPU per rank
    cpu = _spec(tmp_path, "cpu", 0)
    assert _seen(runner, runner.submit(cpu), cpu) == ""  # a CPU job is given none, and sees none
    runner.kill(ha)
    assert _seen(runner, ha, a) == "0"
    assert runner.gpus.held() == {}  # every job that ended gave its GPUs back
    c = _spec(tmp_path, "c", 1)
    assert _seen(runner, runner.submit(c), c) == "0"


def test_the_operator_names_the_gpus_jobs_get():
    from sqft_service.settings import Settings

    assert Settings.from_env({}).job_gpu_ids is None  # every GPU the service sees
    assert Settings.from_env({"SQFT_JOB_GPUS": "1, 2"}).job_gpu_ids == ["1", "2"]
    assert Settings.from_env({"SQFT_JOB_GPUS": "GPU-8f0c1a2b-77de"}).job_gpu_ids == ["GPU-8f0c1a2b-77de"]
    assert Settings.from_env({"SQFT_JOB_GPUS": "none"}).job_gpu_ids == []
    for bad in ("0,0", "0,,1", "0;1"):
        with pytest.raises(SystemExit, match=r"SQFT_JOB_GPUS=.* is not a list of distinct GPU ids"):
            Settings.from_env({"SQFT_JOB_GPUS": bad})


def test_none_hides_every_gpu_from_every_job(tmp_path):
    runner = SubprocessRunner(gpu_ids=[])  # SQFT_JOB_GPUS=none
    assert runner.check_gpu() == "SQFT_JOB_GPUS is `none`: this service gives its jobs no GPU"
    assert runner.check_gpu_workers("auto", 4) is None  # "auto" workers train on CPU cores then
    job = _spec(tmp_path, "hidden", 1)
    job.env["CUDA_VISIBLE_DEVICES"] = "0,1"  # as if the service itself saw two
    assert _seen(runner, runner.submit(job), job) == ""
