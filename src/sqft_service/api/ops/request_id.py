"""``X-Request-ID``: one id per request, in the logs of everything the request does and on its response.

A client's or proxy's id is kept when it is sane (bounded length, no characters that could forge a log
field or a header), so one id follows a request across services; otherwise a new one is made. It is
set in a context variable (``logs.py``) that the log filter reads, and added to every response,
errors and 401s included: this middleware is the outermost one the app adds.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...logs import reset_request_id, set_request_id

HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:+/=-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER and _SANE.match(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        token = set_request_id(request_id)
        # Reset only on a normal return. After an exception the id stays set: Starlette's
        # ServerErrorMiddleware, outside every middleware the app adds, then renders the 500 (app.py adds
        # the header there) and uvicorn logs the access line and the traceback, all in this request's task.
        await self.app(scope, receive, send_with_id)
        reset_request_id(token)
