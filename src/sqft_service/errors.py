"""Typed service errors. One FastAPI handler (in ``app.py``) renders them as OpenAI's envelope:
``{"error": {"message", "type", "param", "code"}}``. Layers below the API raise these; nothing
returns error objects."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(ServiceError):
    status_code = 400
    type = "invalid_request_error"


class NotFoundError(ServiceError):
    status_code = 404
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(message, param=param, code=code)


class ConflictError(ServiceError):
    status_code = 409
    type = "invalid_request_error"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    type = "invalid_request_error"
