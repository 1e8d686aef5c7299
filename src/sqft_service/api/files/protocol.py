"""OpenAI file objects (https://platform.openai.com/docs/api-reference/files/object)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ...store.files import FileRecord

# What clients may upload; "fine-tune-results" (metrics CSVs) and "batch_output" (a batch's answers) files
# are only ever created by the service.
UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "evals", "vision")


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
