"""``GET /ready`` under the Ray runner when the cluster goes away: the ``ray_cluster`` check turns 503
within a bounded time, the service keeps answering, and it still stops at once when asked.

The test starts a head of its own and kills it by its pids (never ``ray stop``): the module-scoped head
of test_ray_runner.py stays up for the other tests. It ends within Ray's own limit: a driver that has
not reached the GCS for 60 s (``gcs_rpc_server_reconnect_timeout_s``) is ended by Ray (README, "Run on
a Ray cluster").
"""

from __future__ import annotations

import time

import httpx
import pytest

from sqft_service.jobs.ray_runner import CHECK_TIMEOUT_S
from tests.helpers import wait_until
from tests.integration.test_ray_runner import ray_server
from tests.ray_cluster import RayNode

pytestmark = pytest.mark.ray


def test_ready_turns_503_naming_the_ray_check_when_the_head_is_gone(tmp_path):
    head = RayNode(num_cpus=1)
    server = None
    try:
        head.wait_started()
        server = ray_server(tmp_path / "data", head)
        up = httpx.get(f"{server.url}/ready", timeout=10)
        assert up.status_code == 200, up.text
        assert up.json()["checks"]["ray_cluster"] == {"ok": True}

        head.stop()
        started = time.monotonic()

        def not_ready() -> httpx.Response | None:
            # Each call is bounded by the check's own timeout, well under the client's.
            resp = httpx.get(f"{server.url}/ready", timeout=CHECK_TIMEOUT_S + 5)
            return resp if resp.status_code == 503 else None

        down = wait_until(not_ready, 30, interval=0.5, what="/ready to report the lost Ray head")
        assert time.monotonic() - started < 30
        body = down.json()
        assert body["status"] == "not_ready"
        ray_check = body["checks"]["ray_cluster"]
        assert ray_check["ok"] is False and "Ray cluster" in ray_check["error"]
        # Only the Ray check fails: the service itself is fine.
        assert all(c["ok"] for name, c in body["checks"].items() if name != "ray_cluster")

        # The route answers within the check's bound every time, and the process stays up.
        for _ in range(3):
            asked = time.monotonic()
            resp = httpx.get(f"{server.url}/ready", timeout=CHECK_TIMEOUT_S + 5)
            assert resp.status_code == 503 and time.monotonic() - asked < CHECK_TIMEOUT_S + 2
        assert server.proc.poll() is None
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200

        # A check still waiting on the lost head does not hold the shutdown (SIGINT, as `docker stop`'s
        # SIGTERM): the service exits cleanly, long before Server.stop's 30 s would kill it.
        stopping = time.monotonic()
        server.stop()
        assert server.proc.returncode == 0 and time.monotonic() - stopping < 15
        server = None
    finally:
        if server is not None:
            server.stop()
        head.stop()
