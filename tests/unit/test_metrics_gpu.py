"""The job gauges of GET /metrics read a running job's newest step from the store (api/ops/metrics.py).

A GPU job's metrics events carry ``gpu_peak_memory_gib`` (training/recipe.py); this machine has no GPU,
so the events are written into a real SQLite store as such a job writes them.
"""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from sqft_service.api.ops.metrics import StoreCollector
from sqft_service.jobs.subprocess_runner import SubprocessRunner
from sqft_service.store.db import Database
from sqft_service.store.events import EventStore
from sqft_service.store.jobs import JobStore


def test_a_running_gpu_jobs_peak_memory_is_a_gauge_and_cpu_jobs_have_none(tmp_path):
    db = Database(tmp_path / "sqft.db")
    jobs, events = JobStore(db), EventStore(db)
    for job_id in ("ftjob-gpu", "ftjob-cpu"):
        jobs.create(job_id=job_id, kind="fine_tune", config={}, workspace=str(tmp_path / job_id), status="running")
    row = {"step": 3, "tokens_per_s": 5000.0, "step_s": 0.1}
    events.add_event("ftjob-gpu", "step 3", type="metrics", data={**row, "gpu_peak_memory_gib": 1.5})
    events.add_event("ftjob-cpu", "step 3", type="metrics", data=row)
    runner = SubprocessRunner(gpu_ids=["0", "1"])
    runner.gpus.take("ftjob-gpu", 1)  # as the runner does when it starts the job
    registry = CollectorRegistry()
    registry.register(StoreCollector(db, SimpleNamespace(running_count=lambda: 2, runner=runner)))
    name = "sqft_job_gpu_peak_memory_bytes"
    assert registry.get_sample_value(name, {"job_id": "ftjob-gpu", "kind": "fine_tune"}) == 1.5 * 2**30
    assert registry.get_sample_value(name, {"job_id": "ftjob-cpu", "kind": "fine_tune"}) is None
    tokens = registry.get_sample_value("sqft_job_tokens_per_second", {"job_id": "ftjob-cpu", "kind": "fine_tune"})
    assert tokens == 5000.0
    assert registry.get_sample_value("sqft_gpu_jobs", {"gpu": "0"}) == 1
    assert registry.get_sample_value("sqft_gpu_jobs", {"gpu": "1"}) == 0
    db.close()
