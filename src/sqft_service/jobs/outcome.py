"""How a job ended: the one thing the job process writes and the manager reads, whatever the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ..errors import UserError
from ..workspace import write_atomically


class JobError(BaseModel):
    """A job's ``error`` (OpenAI's fields) and whether the client's input caused it."""

    code: str
    message: str
    param: str | None = None
    user_error: bool = False

    @classmethod
    def from_user_error(cls, exc: UserError) -> JobError:
        return cls(code=exc.code, message=exc.message, param=exc.param, user_error=True)

    def public(self) -> dict[str, Any]:
        """The job object's ``error``: code, message, param."""
        return {"code": self.code, "message": self.message, "param": self.param}


class JobOutcome(BaseModel):
    """``succeeded`` with the kind's ``result``, ``failed`` with an ``error``, or ``stopped`` (cancelled)."""

    status: Literal["succeeded", "failed", "stopped"]
    result: dict[str, Any] | None = None
    error: JobError | None = None

    def write(self, path: Path) -> None:
        write_atomically(path, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> JobOutcome | None:
        """The outcome at ``path``, or None when the job process ended without writing one."""
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return None
