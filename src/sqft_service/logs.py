"""Log format of the service and of its job processes: ``text`` (default) or ``json`` (``SQFT_LOG_FORMAT``).

JSON is one object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, and
``request_id`` / ``job_id`` where there is one (plus ``exc_info`` for a traceback, and ``method``,
``path``, ``status``, ``client`` on uvicorn's access lines). The request id comes from a
:class:`~contextvars.ContextVar` that ``api/ops/request_id.py`` sets for each request; a job process
stamps its job id on every record. Torch-free: the job process and the CLI import this.
"""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from typing import Any

# python-json-logger's formatter is a logging.Formatter subclass with no dependencies of its own; it
# already renders exceptions, stack info and extras that json cannot encode, which a home-made one
# would have to redo.
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_REQUEST_ID: ContextVar[str | None] = ContextVar("sqft_request_id", default=None)


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


def set_request_id(request_id: str | None) -> Any:
    """Set the id for the current context; returns the token for :meth:`ContextVar.reset`."""
    return _REQUEST_ID.set(request_id)


def reset_request_id(token: Any) -> None:
    _REQUEST_ID.reset(token)


class ContextFilter(logging.Filter):
    """Puts the request id (and a job process's job id) on each record that passes its handler.

    On the handler rather than a logger: a logger's filters do not see records from its children.
    """

    def __init__(self, job_id: str | None = None) -> None:
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        if self.job_id is not None and not hasattr(record, "job_id"):
            record.job_id = self.job_id
        # uvicorn's access line: its arguments as fields, so a log store can filter on them.
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args
            record.client, record.method, record.path, record.status = client, method, path, status
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # record.created as an aware UTC datetime, written with isoformat()
        # uvicorn adds a colourised copy of its message; taskName is a record attribute on Python 3.12+.
        reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
    )


def logging_config(log_format: str, *, job_id: str | None = None, stream: str = "ext://sys.stderr") -> dict:
    """A ``logging.config.dictConfig`` for the root logger and uvicorn's loggers, which propagate to it."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    formatter = {"()": json_formatter} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter, "job_id": job_id}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["context"],
                "stream": stream,
            }
        },
        "root": {"handlers": ["default"], "level": "INFO"},
        # Listed so that handlers an earlier configuration gave them are removed: one format, one stream.
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(log_format: str, *, job_id: str | None = None, stream: str = "stderr") -> None:
    """Configure this process's logging (``stream``: "stdout" or "stderr"); in JSON mode Python
    warnings go through logging too."""
    logging.config.dictConfig(logging_config(log_format, job_id=job_id, stream=f"ext://sys.{stream}"))
    if log_format == "json":
        logging.captureWarnings(True)
