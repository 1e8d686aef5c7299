"""Who is asking: the project of the request's API key, as a request-scoped value the services read.

``api/auth.py`` sets it for each authenticated request. The services check it where they look objects
up (``get``, ``resolve``, ``list``) and stamp it on what they create, so every route that goes
through a service lookup is scoped, including routes added later, without an ``owner`` argument on
every signature.

``None`` means unrestricted: no keys are configured (single-tenant, every object visible, new
objects stored with ``owner`` NULL), or the code runs outside a request (the job manager's thread).
With keys configured every request carries a project name, so rows created without auth (``owner``
NULL) match no caller.

A ``ContextVar`` reaches the endpoint because the middleware awaits the app in the same task and
Starlette runs sync endpoints through ``anyio.to_thread.run_sync``, which copies the context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_OWNER: ContextVar[str | None] = ContextVar("sqft_owner", default=None)


def current_owner() -> str | None:
    """The caller's project, or ``None`` when nothing restricts what it sees."""
    return _OWNER.get()


def owned_by_caller(row_owner: str | None) -> bool:
    owner = _OWNER.get()
    return owner is None or row_owner == owner


@contextmanager
def acting_as(owner: str | None) -> Iterator[None]:
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)
