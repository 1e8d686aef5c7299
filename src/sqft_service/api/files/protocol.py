"""OpenAI file objects (https://platform.openai.com/docs/api-reference/files/object)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import InvalidRequestError
from ...store.files import FileRecord

# What clients may upload; "fine-tune-results" (metrics CSVs) and "batch_output" (a batch's answers) files
# are only ever created by the service.
UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "evals", "vision")


# OpenAI's bounds on a file's lifetime: one hour to thirty days after its creation.
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600


class ExpiresAfter(BaseModel):
    """OpenAI's ``expires_after``: the file is deleted ``seconds`` after ``anchor`` (its creation)."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S)


def form_expires_after(fields: dict[str, str], param: str = "expires_after") -> int | None:
    """The seconds of a multipart form's ``expires_after[anchor]`` / ``expires_after[seconds]`` (as the
    SDK sends them), or None when the form has neither.

    Raises:
        InvalidRequestError: naming ``param``.
    """
    given = {k[len(param) + 1 : -1]: v for k, v in fields.items() if k.startswith(f"{param}[") and k.endswith("]")}
    if not given:
        return None
    try:
        return ExpiresAfter.model_validate(given).seconds
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(
            f"`{param}`: {where or 'value'}: {first['msg']} (anchor 'created_at', seconds {MIN_EXPIRY_S} to "
            f"{MAX_EXPIRY_S})",
            param=param,
        ) from None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    # Extension fields: what the upload check found.
    sha256: str | None = None
    format: str | None = None
    n_records: int | None = None
    n_images: int | None = None  # image parts in chat records (vision fine-tuning)

    @classmethod
    def from_record(cls, r: FileRecord) -> FileObject:
        return cls(
            id=r.id,
            bytes=r.bytes,
            created_at=r.created_at,
            filename=r.filename,
            purpose=r.purpose,
            status=r.status,
            status_details=r.status_details,
            sha256=r.sha256,
            format=r.meta.get("format"),
            n_records=r.meta.get("n_records"),
            n_images=r.meta.get("n_images"),
            expires_at=r.expires_at,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
