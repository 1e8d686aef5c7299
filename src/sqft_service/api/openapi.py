"""What the OpenAPI schema says about errors and non-JSON bodies, so that it describes what the service sends.

Every error is the envelope ``{"error": {"message", "type", "param", "code"}}`` (:class:`ErrorResponse`).
Routes declare the errors their service raises (404 for an object named in the body, 409) with
:func:`error_responses`; :func:`document_errors` adds, by rule, the ones the layers around every route
answer: 401 (``api/auth.py``, where the operation declares the bearer scheme), 400 (request validation,
``app.py``), 413 (``api/body_limit.py``), 415 (``api/content_type.py``) and 404 (an object named in the
path). It also drops FastAPI's automatic 422: this service answers invalid requests with a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/"

DESCRIPTIONS = {
    202: "Accepted: the operation runs",
    400: "Invalid request: the message names the field",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    403: "Not allowed on this object (e.g. deleting a base model)",
    404: "No such object (or another project's)",
    409: "Conflict with the object's state",
    413: "Request body over the size limit",
    415: "Body not declared as JSON (`Content-Type: application/json`)",
    429: "The project's quota is used up (unfinished jobs, stored files), or the inference queue is full",
    503: "The device has no memory left for this generation now (`Retry-After`); a smaller one may fit",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; every error response of the service has this shape."""

    error: ErrorDetail


def metadata_query(what: str) -> dict[str, Any]:
    """``openapi_extra=`` of a list route that reads OpenAI's ``metadata[key]=value`` filter from the raw
    query (``limits.metadata_filter``; FastAPI has no deepObject parameters)."""
    description = f"`metadata[key]=value`: only {what} with every pair; `metadata=null`: {what} without metadata"
    parameter = {"name": "metadata", "in": "query", "required": False, "style": "deepObject", "explode": True}
    schema = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"parameters": [{**parameter, "description": description, "schema": schema}]}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: these status codes, each with the error envelope."""
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


def file_response(media_type: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route that answers a file (``FileResponse``) of ``media_type``."""
    schema = {"type": "string"} if media_type.startswith("text/") else {"type": "string", "format": "binary"}
    return {200: {"description": "The file", "content": {media_type: {"schema": schema}}}}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the errors of the layers around the routes on every operation of ``schema`` (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    envelope = ErrorResponse.model_json_schema(ref_template=REF + "{model}")
    for name, definition in envelope.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorResponse", envelope)
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for operations in schema.get("paths", {}).values():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            parameters = operation.get("parameters", [])
            body = operation.get("requestBody", {}).get("content", {})
            codes = []
            if operation.get("security"):
                codes.append(401)
            if method == "post" or body or any(p.get("in") == "query" for p in parameters):
                codes.append(400)
            if any(p.get("in") == "path" for p in parameters):
                codes.append(404)
            if method == "post":
                codes.append(413)
                if "multipart/form-data" not in body:
                    codes.append(415)
            for code in codes:
                responses.setdefault(
                    str(code),
                    {
                        "description": DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": {"$ref": REF + "ErrorResponse"}}},
                    },
                )
    return schema


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra=`` of a route that parses its JSON body itself: the body ``model`` validates."""
    schema = model.model_json_schema(ref_template=REF + "{model}")
    if "$defs" in schema:  # nothing to hoist for the flat request models this is used with
        raise ValueError(f"{model.__name__} has nested models; declare it as the route's body instead")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def multipart_body(file_field: str, **fields: dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra`` for a ``multipart/form-data`` body it parses itself (``files/upload.py``):
    the required binary ``file_field`` and the optional ``fields`` (name -> JSON schema)."""
    properties = {file_field: {"type": "string", "format": "binary"}, **fields}
    schema = {"type": "object", "required": [file_field], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
