"""Concurrent clients against the real server (a subprocess): no error, no lost or repeated row.

The small version of ``make load``, through the same harness (``bench/load``): 10 clients x 20
requests (uploads, job creation, job lists and pages, job retrieval, events, file lists, file
retrieval) over a data dir seeded with 300 finished jobs. No timing is asserted.
"""

from __future__ import annotations

from bench.load.harness import LoadOptions, run


def test_concurrent_clients_lose_and_repeat_nothing(tmp_path, tiny_model_dir):
    options = LoadOptions(
        clients=10, requests=20, stored_jobs=300, stored_files=10, events_per_job=4, alone_per_route=0
    )
    result = run(options, tiny_model_dir, tmp_path, log=lambda _: None)

    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, failed
    load = result["load"]
    assert load["requests"] == 200
    assert load["uploads"] > 0 and load["jobs_created"] > 0  # the seeded mix writes as well as reads
    assert {r["route"] for r in load["routes"]} >= {"POST /v1/files", "POST /v1/fine_tuning/jobs", "all"}


def test_concurrent_clients_without_api_keys(tmp_path, tiny_model_dir):
    """Single-tenant (no keys): rows without an owner, the lists' other queries; same guarantees."""
    options = LoadOptions(
        clients=10, requests=10, stored_jobs=100, stored_files=5, events_per_job=3, alone_per_route=0, auth=False
    )
    result = run(options, tiny_model_dir, tmp_path, log=lambda _: None)

    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, failed
