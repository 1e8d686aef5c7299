"""Server-sent events as HTTP answers: chat and completion streams, Responses' streams."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.responses import StreamingResponse


def event_stream(events: Iterator[str]) -> StreamingResponse:
    """``events`` (SSE text) sent as they come: no-cache and no proxy buffering, so each event reaches the
    client as it is generated."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
