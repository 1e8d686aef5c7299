"""API keys: ``Authorization: Bearer <key>`` on every route but ``/health``, ``/ready`` and the docs.

``SQFT_API_KEY`` holds one or more comma-separated entries, each ``key`` or ``project:key``. A key's
project owns what the key creates (``api/owner.py``): ``alice:k1,bob:k2`` makes two projects that
cannot see each other's files and jobs; keys without a name all belong to the project ``default``, so
``k1,k2`` is one project with two keys (rotate by adding the new key, then removing the old one).
A key that itself contains ``:`` must be given a project name. No entries: no authentication, one
tenant, as before.

The check runs in :class:`ApiKeyMiddleware`, before routing, because FastAPI reads a route's whole
body (a multipart upload included) before it runs any dependency: a dependency alone would let an
unauthenticated client stream a large upload to disk before being turned away. The routers still get
:func:`require_api_key` as a dependency so the OpenAPI schema declares the bearer scheme (and the
Swagger UI offers "Authorize").

``/health`` and ``/ready`` stay open for load balancers and probes (``api/ops/router.py`` says why
``/metrics`` does not). ``/docs``, ``/redoc`` and ``/openapi.json`` stay open too: they describe the
API, not its data, and a browser cannot send a bearer header when it opens ``/docs``; the key is
entered in the page's "Authorize" dialog.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import AuthenticationError
from .owner import acting_as, current_owner

DEFAULT_PROJECT = "default"
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Visible ASCII except ',' (the entry separator): what a client can send in a header as typed.
_KEY_CHARS = re.compile(r"^[!-+\--~]+$")

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
# The offered key is not echoed back, not even in part: it may be a credential for another service.
WRONG_KEY_MESSAGE = "Incorrect API key provided. Use a key this service was started with (SQFT_API_KEY)."


class ApiKeys:
    """The configured keys and their projects; :meth:`project_of` compares in constant time."""

    def __init__(self, projects: dict[str, str]) -> None:
        # Compare SHA-256 digests rather than the keys: equal-length inputs, so the comparison time
        # reveals neither a key's characters nor its length.
        self._digests = [(hashlib.sha256(key.encode()).digest(), project) for key, project in projects.items()]
        self.projects = tuple(sorted(set(projects.values())))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def parse(cls, raw: str | None, variable: str = "SQFT_API_KEY") -> ApiKeys:
        """``key`` / ``project:key`` entries, comma-separated. Errors name the entry, never the key."""
        projects: dict[str, str] = {}
        text = (raw or "").strip()
        for number, entry in enumerate(text.split(",") if text else (), start=1):
            entry = entry.strip()
            if not entry:
                continue  # a trailing or doubled comma
            name, sep, key = entry.partition(":")
            if not sep:
                name, key = DEFAULT_PROJECT, entry
            elif not _PROJECT_NAME.match(name):
                raise ValueError(
                    f"{variable}: entry {number} is not `key` or `project:key` (a project name is letters, "
                    "digits, '_', '-' and '.'; a key that contains ':' needs a project name in front)"
                )
            if not key or not _KEY_CHARS.match(key):
                raise ValueError(f"{variable}: the key of entry {number} is empty or not visible ASCII characters")
            if projects.get(key, name) != name:
                raise ValueError(f"{variable}: entry {number} gives an earlier key a second project")
            projects[key] = name
        if text and not projects:
            # "SQFT_API_KEY=," must not silently mean "no authentication".
            raise ValueError(f"{variable} is set but holds no key")
        return cls(projects)

    def project_of(self, token: bytes) -> str | None:
        digest = hashlib.sha256(token).digest()
        found = None
        for key_digest, project in self._digests:  # every key, no early exit
            if hmac.compare_digest(digest, key_digest):
                found = project
        return found


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI: answers 401 before the app reads anything; otherwise runs the request as the key's project."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys, open_paths: Iterable[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        project = self.keys.project_of(token) if token is not None else None
        if project is None:
            error = AuthenticationError(MISSING_KEY_MESSAGE if token is None else WRONG_KEY_MESSAGE)
            response = JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)
            await response(scope, receive, send)
            return
        with acting_as(project):
            await self.app(scope, receive, send)


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="One of the keys in SQFT_API_KEY, sent as `Authorization: Bearer <key>`.",
)


async def require_api_key(_: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """The routers' dependency: puts the bearer scheme in the OpenAPI schema.

    :class:`ApiKeyMiddleware` has already checked the key; this refuses a request that reached a
    protected route without a project, so a router mounted without the middleware fails closed.
    """
    if current_owner() is None:
        raise AuthenticationError(MISSING_KEY_MESSAGE)


def install_auth(app: FastAPI, keys: ApiKeys, *, open_paths: Iterable[str]) -> list[Any]:
    """With keys: add the middleware and return the routers' dependency. Without: nothing changes."""
    if not keys:
        return []
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=[*open_paths, *(p for p in docs if p)])
    return [Security(require_api_key)]


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the service on this machine (literal loopback addresses only:
    a hostname other than ``localhost`` could resolve anywhere)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
