"""Request-body helpers shared by the reference-dialect routes."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequestError

# The reference README's curls interpolate ids without quotes ({"fine_tuning_job_id": ${id}}), which
# is not JSON once the shell expands it. Accept that one shape so its examples work verbatim.
_BARE_VALUE = re.compile(r'("[A-Za-z_]+"\s*:\s*)([A-Za-z][A-Za-z0-9_\-.]*)(\s*[,}])')


def parse_lenient_json(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    except RecursionError:  # `[` x 100000: json recurses once per level and gives up
        raise InvalidRequestError("the request body is not valid JSON: it is nested too deeply") from None
    repaired = _BARE_VALUE.sub(lambda m: f'{m.group(1)}"{m.group(2)}"{m.group(3)}', text)
    repaired = re.sub(r",\s*}", "}", repaired)  # the README's custom_config example ends with "],\n}"
    try:
        return json.loads(repaired)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is not valid JSON: it is nested too deeply") from None


def validate_body(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error_to_service_error(exc.errors(), payload) from None


_UNSEEN = object()  # no payload to walk beside the location


def _loc(loc: tuple | list, payload: Any = _UNSEEN, kind: str = "") -> str:
    """A pydantic location as the request names the field: ``messages[0].content[1].image_url``. A union's
    branch labels (``list[tagged-union[...]]``, ``function-after[...]``) are not fields, nor the tag a
    tagged union adds where it reaches the value (``image_url`` for a ``{"type": "image_url"}`` part,
    ``completions`` for a ``{"type": "completions"}`` data source). Walking ``payload`` (the body as
    sent) beside the location tells a tag from a field of the same name (``kind``: the error's type; a
    ``missing`` field is the location's last part, never a tag)."""
    out, tagged = "", False
    node, arrived = payload, True  # the value the location has reached; just reached
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    for k, part in enumerate(parts):
        if "[" in part:
            tagged = tagged or "tagged-union[" in part
            continue
        if part.isdigit():
            out += f"[{part}]"
            node = node[int(part)] if isinstance(node, list) and int(part) < len(node) else _UNSEEN
            arrived = True
            continue
        after = parts[k + 1] if k + 1 < len(parts) else None
        if (
            isinstance(node, dict)
            and arrived
            and node.get("type") == part
            and (after == part or (part not in node and (after is not None or kind != "missing")))
        ):
            tagged = arrived = False  # the tag: the object's own "type", then a field of that name or another
            continue
        if tagged and node is _UNSEEN:  # the tag, known only from the label before it
            tagged = False
            continue
        tagged = False
        out += f".{part}" if out else part
        node, arrived = (node.get(part, _UNSEEN) if isinstance(node, dict) else _UNSEEN), True
    return out


# Errors that say only that a value is of another kind: a union reports one per alternative it tried.
_KIND = {"string_type", "list_type", "dict_type", "model_type", "model_attributes_type", "none_required"}


def _chosen(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: the first, unless it is a union alternative's "not a string" beside one that
    went further into the value (``content`` sent as parts, one of them wrong): that one."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") not in _KIND or len(loc) < 2:
        return first
    within = [e for e in errors if tuple(e.get("loc", ()))[: len(loc) - 1] == loc[:-1]]
    return max(within, key=lambda e: (len(e.get("loc", ())), e.get("type") not in _KIND))


def validation_error_to_service_error(errors: list[dict[str, Any]], payload: Any = _UNSEEN) -> InvalidRequestError:
    """The first pydantic error (``_chosen``) as a message that names the field (unknown keys too);
    ``payload``: the body validated, to tell tagged unions' tags from fields (``_loc``)."""
    first = _chosen(errors)
    param = _loc(first.get("loc", ()), payload, first.get("type", "")) or None
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    if kind == "json_invalid":  # FastAPI's own body parsing; its loc ("body", 0) names no field
        detail = (first.get("ctx") or {}).get("error")
        return InvalidRequestError(f"the request body is not valid JSON{f': {detail}' if detail else ''}")
    if kind == "extra_forbidden":
        message = f"Unknown parameter `{param}`: not a field of this request (check its spelling)"
    elif kind == "missing":
        message = f"Missing required parameter `{param}`"
    elif kind == "value_error" and "`" in msg:  # our validators already name the field
        message = msg.removeprefix("Value error, ")
        # A whole-body (or whole-object) check names the field it found wrong first: that field, if within.
        named = re.match(r"`([^`]+)`: ", message)
        if named and (param is None or named.group(1).startswith(f"{param}.")):
            param = named.group(1)
        elif named and "." not in named.group(1):  # an object's check naming one of its own fields
            param = f"{param}.{named.group(1)}"
    else:
        message = f"Invalid value for `{param}`: {msg.removeprefix('Value error, ')}"
    # A union alternative passed over (``_chosen``) is no error of the request's.
    if (more := len(errors) - (1 if first is errors[0] else 2)) > 0:
        message += f" (and {more} more error(s))"
    return InvalidRequestError(message, param=param)
