"""Bounds on what one request may send or ask for, checked before the work (or the damage) happens.

Sizes that an operator may want to change are settings (``max_upload_mb``, ``max_json_bytes``); the
rest are fixed here: they follow OpenAI's documented limits where there are some, and otherwise keep
one answer to a bounded size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator

from ..errors import InvalidRequestError, NotFoundError
from ..training.records import json_type

# Page sizes of the list routes: (default, maximum); a bigger `limit` is a 400 naming `limit`.
# Files keep OpenAI's documented 1..10,000 with a default of 10,000 (a file object is small and bounded).
FILES_PAGE = (10_000, 10_000)
# Job and operation objects carry their configuration (up to a JSON body's size), so fewer per page.
JOBS_PAGE = (20, 100)
OPERATIONS_PAGE = (20, 100)
EVENTS_PAGE = (20, 1_000)
CHECKPOINTS_PAGE = (10, 100)

T = TypeVar("T")


def page_of(
    items: Sequence[T], id_of: Callable[[T], str], *, after: str | None, limit: int, newest_first: bool, what: str
) -> tuple[list[T], bool]:
    """One page of a short list held in memory (a response's input items, a model's permissions), oldest
    first unless ``newest_first``, starting after the item whose id is ``after`` (a 404 naming ``after``
    if the list has none such): the page and whether more follow."""
    ordered = list(reversed(items)) if newest_first else list(items)
    if after is not None:
        ids = [id_of(item) for item in ordered]
        if after not in ids:
            raise NotFoundError(f"No {what} has id '{after}'", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    return ordered[:limit], len(ordered) > limit


# OpenAI's `metadata`: at most 16 pairs, keys up to 64 characters, values strings up to 512.
METADATA_MAX_KEYS = 16
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512

# A multipart upload may exceed the file limit by this much: boundaries, part headers and the small
# form fields (`purpose`) around the file. Beyond it the body is refused before the file is read.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Form fields other than the file (`purpose`, ...): how many, and how big each may be.
MAX_FORM_FIELDS = 16
MAX_FORM_FIELD_BYTES = 4 * 1024


def check_metadata(value: Any) -> Any:
    """OpenAI's metadata rules; a ValueError names `metadata` (pydantic turns it into the 400)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("`metadata` must be an object of string keys and string values")
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"`metadata` has {len(value)} keys; at most {METADATA_MAX_KEYS} are allowed")
    for key, item in value.items():
        if len(key) > METADATA_KEY_MAX_CHARS:
            raise ValueError(
                f"`metadata` key '{key[:METADATA_KEY_MAX_CHARS]}...' is {len(key)} characters long; "
                f"keys are at most {METADATA_KEY_MAX_CHARS}"
            )
        if not isinstance(item, str):
            raise ValueError(f"`metadata` value of '{key}' must be a string, got {json_type(item)}")
        if len(item) > METADATA_VALUE_MAX_CHARS:
            raise ValueError(
                f"`metadata` value of '{key}' is {len(item)} characters long; values are at most "
                f"{METADATA_VALUE_MAX_CHARS}"
            )
    return value


def metadata_filter(query: Mapping[str, str]) -> dict[str, str] | None:
    """OpenAI's list filter from a query string: ``metadata[key]=value`` pairs, or ``metadata=null``
    (``{}``: jobs without metadata); None when the query has neither. Bounded like ``metadata`` itself.

    Raises:
        InvalidRequestError: naming ``metadata``.
    """
    pairs = {k[len("metadata[") : -1]: v for k, v in query.items() if k.startswith("metadata[") and k.endswith("]")}
    if "metadata" in query:
        if query["metadata"] != "null" or pairs:
            raise InvalidRequestError(
                "filter by `metadata[key]=value` (one or more), or `metadata=null` for jobs without metadata",
                param="metadata",
            )
        return {}
    if not pairs:
        return None
    try:
        check_metadata(pairs)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="metadata") from None
    return pairs


# OpenAI's metadata rules, checked before the type so that every violation names `metadata`.
Metadata = Annotated[dict[str, str], BeforeValidator(check_metadata)]
