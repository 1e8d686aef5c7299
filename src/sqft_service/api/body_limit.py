"""Request-body size limits that hold while the body arrives, before it is buffered or parsed.

FastAPI reads a JSON body whole into memory (``await request.body()``) before any validator runs, so a
limit checked on the parsed value comes after the memory is spent. This ASGI middleware answers 413 as
soon as ``Content-Length`` says a body is too big (without reading it), and otherwise reads at most
the limit (a chunked body has no length) before the app sees the bytes, which it then replays.

The upload routes (``POST /v1/files``, ``POST /v1/uploads/{id}/parts``) have their own, larger
limits and stream their bodies themselves (``api/files/upload.py`` stops at the limit); here they only
get the ``Content-Length`` check. The
413 is the OpenAI error envelope, and ``Connection: close`` spares the server from draining the rest.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_ROUTE = ("POST", "/v1/files")
# JSON routes that take images (base64 ``data:`` URLs: inference/images.py), under their own larger limit.
MEDIA_ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/responses")}


def _is_part_route(method: str, path: str) -> bool:
    """``POST /v1/uploads/{upload_id}/parts``."""
    pieces = path.split("/")
    return method == "POST" and len(pieces) == 5 and pieces[:3] == ["", "v1", "uploads"] and pieces[4] == "parts"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before we run
    return None


async def _too_large(send: Send, message: str, param: str | None, code: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_json_bytes: int,
        max_upload_body_bytes: int,
        max_part_body_bytes: int,
        max_media_json_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_media_json_bytes = max_media_json_bytes or max_json_bytes
        self.max_upload_body_bytes = max_upload_body_bytes
        self.max_part_body_bytes = max_part_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        method, path = scope["method"], scope["path"].rstrip("/")
        streamed = None
        if (method, path) == UPLOAD_ROUTE:
            streamed = (self.max_upload_body_bytes, "the upload", "file")
        elif _is_part_route(method, path):
            streamed = (self.max_part_body_bytes, "the part", "data")
        if streamed is not None:
            limit, what, param = streamed
            if length is not None and length > limit:
                await _too_large(
                    send,
                    f"{what} is {length} bytes, over the limit of {limit} bytes (file and form fields together)",
                    param,
                    "file_too_large",
                )
                return
            await self.app(scope, receive, send)
            return

        limit = self.max_media_json_bytes if (method, path) in MEDIA_ROUTES else self.max_json_bytes
        message = f"the request body is larger than the limit of {limit} bytes"
        if length is not None and length > limit:
            message = f"the request body is {length} bytes, over the limit of {limit} bytes"
            await _too_large(send, message, None, "request_too_large")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return  # the client left before it finished sending: there is no one to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, message, None, "request_too_large")
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            # The body once, then the real channel: routes that wait (api/sqft) watch it for a disconnect.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
