"""Errors, in two families.

* :class:`UserError`: the client's input (a file, a model, a configuration) is wrong. Raised anywhere
  below the API (data, models, adapters, config checks) and carried across the job boundary as a
  ``JobOutcome`` error. It knows its ``code`` and ``param`` but not how it is shown: the API renders it
  as OpenAI's 400 envelope (``app.py``), the CLI as one line on stderr (``cli.py``), a job as its
  ``error`` object (``jobs/worker.py``).
* :class:`ServiceError`: an HTTP-level outcome raised by the API services (404, 409, 413, ...). One
  FastAPI handler renders both as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class UserError(ValueError):
    """The client's input is wrong; the message says what and, where it can, ``param`` names the field.

    Subclasses set class-level defaults for ``code`` and ``param``; a raise site may override either.
    It is a ``ValueError`` so code that validates values can catch it the usual way.
    """

    code: str = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code

    def to_error(self) -> dict[str, str | None]:
        """The OpenAI ``error`` object (also a job's ``error``): code, message, param."""
        return {"code": self.code, "message": self.message, "param": self.param}


class InvalidConfigurationError(UserError):
    """A job setting that cannot work (on this model, this machine or this version)."""

    code = "invalid_configuration"


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


class QuotaExceededError(ServiceError):
    """A project holds as many objects of a kind as the operator allows (OpenAI answers quotas with 429)."""

    status_code = 429
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "quota_exceeded") -> None:
        super().__init__(message, param=param, code=code)


class EngineOutOfMemoryError(ServiceError):
    """503: the device has no memory left for this request now (a GPU shared with training jobs, say).

    Not the client's fault and not a crash: the same request may fit later, a smaller one now.
    """

    status_code = 503
    type = "server_error"
    headers = {"Retry-After": "10"}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "out_of_memory") -> None:
        super().__init__(message, param=param, code=code)


class PayloadTooLargeError(ServiceError):
    status_code = 413
    type = "invalid_request_error"


class AuthenticationError(ServiceError):
    """401: no API key, or not one of the configured keys (``api/auth.py``)."""

    status_code = 401
    type = "invalid_request_error"
    # RFC 6750: a 401 names the scheme the client should use.
    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "invalid_api_key") -> None:
        super().__init__(message, param=param, code=code)


class UnsupportedMediaTypeError(ServiceError):
    """415: a JSON route got a body that is not declared ``application/json`` (``api/content_type.py``)."""

    status_code = 415
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "unsupported_media_type") -> None:
        super().__init__(message, param=param, code=code)
