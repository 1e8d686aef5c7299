"""JSON routes take only ``Content-Type: application/json`` bodies (415 otherwise).

The reference-dialect routes parse their raw body leniently (``api/body.py``), so without this check
they would accept ``text/plain``. A web page can POST ``text/plain`` (or a body with no declared type)
to any origin without a CORS preflight, so any page a user opens could cancel jobs or start operations
on a service that listens on localhost without a key. ``application/json`` from another origin needs a
preflight, which this service never grants (it sends no CORS headers).

A POST without a body (``/v1/fine_tuning/jobs/{id}/cancel`` as the SDK sends it) passes: there is
nothing to parse, and curl users call those routes without a header. The multipart upload route is on
the files router, which does not get this dependency.
"""

from __future__ import annotations

from fastapi import Request

from ..errors import UnsupportedMediaTypeError

_BODY_METHODS = ("POST", "PUT", "PATCH")


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() not in ("", "0"))


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def require_json(request: Request) -> None:
    if request.method not in _BODY_METHODS or not _has_body(request):
        return
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        got = f"'{content_type[:100]}'" if content_type else "no Content-Type"
        raise UnsupportedMediaTypeError(
            f"This route takes a JSON body: send it with `Content-Type: application/json` (got {got})"
        )
