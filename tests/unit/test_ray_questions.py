"""The Ray runner's questions to the cluster (``RayRunner._ask_cluster``) with a head that does not answer:
each is asked once and waited for at most CHECK_TIMEOUT_S from its first asking, however many checks of
one request ask it. The real method on a runner that skips ``connect`` (no cluster is needed to ask a
question that blocks)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from sqft_service.jobs import ray_runner
from sqft_service.jobs.ray_runner import RayRunner


@pytest.fixture
def runner(monkeypatch) -> RayRunner:
    monkeypatch.setattr(ray_runner, "CHECK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ray_runner, "connect", lambda address, namespace: None)
    return RayRunner("127.0.0.1:1")


def test_a_lost_head_is_waited_for_once_per_question(runner):
    release = threading.Event()
    calls = []

    def lost_head():
        calls.append(1)
        release.wait(10)
        return {"GPU": 2.0}

    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        runner._ask_cluster("resources", lost_head)
    assert 0.4 < time.monotonic() - started < 1.5
    again = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):  # the second check of the same request
        runner._ask_cluster("resources", lost_head)
    assert time.monotonic() - again < 0.2  # no second wait ...
    assert len(calls) == 1  # ... and no second call
    release.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # once answered, the answer is there ...
        try:
            answer = runner._ask_cluster("resources", lost_head)
            break
        except concurrent.futures.TimeoutError:
            time.sleep(0.05)
    assert answer == {"GPU": 2.0}
    # ... and the next question is asked afresh.
    assert runner._ask_cluster("resources", lambda: {"GPU": 4.0}) == {"GPU": 4.0}


def test_questions_wait_on_their_own(runner):
    release = threading.Event()
    with pytest.raises(concurrent.futures.TimeoutError):
        runner._ask_cluster("nodes", lambda: release.wait(10))
    assert runner._ask_cluster("resources", lambda: {"GPU": 1.0}) == {"GPU": 1.0}
    release.set()
