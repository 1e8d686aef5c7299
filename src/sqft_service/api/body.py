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
        raise validation_error_to_service_error(exc.errors()) from None


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def validation_error_to_service_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """The first pydantic error as a message that names the field (unknown keys too)."""
    first = errors[0]
    param = _loc(first.get("loc", ())) or None
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
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return InvalidRequestError(message, param=param)
