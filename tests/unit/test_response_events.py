"""A background response's event log: readers follow it from any sequence number while it is written
(each in its own thread), see it stored before it ends, and get keep-alive comments while it waits."""

from __future__ import annotations

import json
import threading

from sqft_service.api.responses import events as events_module
from sqft_service.api.responses.events import EventLog, replayed


def _numbers(blocks: list[str]) -> list[int]:
    return [json.loads(b.split("data: ", 1)[1])["sequence_number"] for b in blocks if b.startswith("event:")]


def test_followers_from_any_number_get_each_event_once_and_end_with_the_log():
    log = EventLog()
    log.add("response.created", {"response": {"id": "r"}})
    got: dict[int | None, list[str]] = {}
    readers = [
        threading.Thread(target=lambda a=after: got.__setitem__(a, list(log.follow(a)))) for after in (None, 0, 2)
    ]
    for reader in readers:
        reader.start()
    for n in range(3):
        log.add("response.output_text.delta", {"delta": str(n)})
    stored: list[list[dict]] = []
    log.close(("response.completed", {"response": {"id": "r"}}), stored.append)
    log.add("response.output_text.delta", {"delta": "after the end"})  # a cancelled generation's last token
    for reader in readers:
        reader.join(10)
        assert not reader.is_alive()
    assert _numbers(got[None]) == [0, 1, 2, 3, 4] and _numbers(got[0]) == [1, 2, 3, 4] and _numbers(got[2]) == [3, 4]
    assert [e["sequence_number"] for e in stored[0]] == [0, 1, 2, 3, 4] and stored[0][-1][
        "type"
    ] == "response.completed"
    assert _numbers(list(log.follow(None))) == [0, 1, 2, 3, 4]  # a reader after the end reads it whole


def test_a_waiting_follower_gets_keep_alive_comments(monkeypatch):
    monkeypatch.setattr(events_module, "KEEP_ALIVE_S", 0.05)
    log = EventLog()
    follower = log.follow(None)
    assert next(follower) == ": keep-alive\n\n"  # nothing yet: a comment, so the client sees the stream alive
    log.add("response.created", {"response": {}})
    assert _numbers([next(follower)]) == [0]
    log.close()
    assert list(follower) == []


def test_a_response_whose_events_were_lost_replays_as_created_then_as_it_ended():
    body = {"id": "r", "status": "failed", "output": [], "error": {"code": "server_error"}, "usage": None}
    blocks = list(replayed(body, None, None))
    first, second = (json.loads(b.split("data: ", 1)[1]) for b in blocks)
    assert first["type"] == "response.created" and first["response"]["status"] == "queued"
    assert first["response"]["error"] is None and second == {
        "type": "response.failed",
        "sequence_number": 1,
        "response": body,
    }
    assert _numbers(list(replayed(body, None, 0))) == [1]
    cancelled = {**body, "status": "cancelled", "error": None}
    assert _numbers(list(replayed(cancelled, None, None))) == [0]  # no event says cancelled: the stream ends
