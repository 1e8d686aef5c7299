"""OpenAI's Upload and Upload Part objects and request bodies
(https://platform.openai.com/docs/api-reference/uploads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...store.files import FileRecord
from ...store.uploads import PartRecord, UploadRecord
from ..files.protocol import ExpiresAfter, FileObject

# OpenAI's part ids in one completion: as many as an upload may have parts.
MAX_UPLOAD_PARTS = 10_000


class CreateUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(max_length=1024)
    purpose: str = Field(max_length=64)
    bytes: int = Field(ge=1)
    mime_type: str = Field(min_length=1, max_length=255)
    expires_after: ExpiresAfter | None = None  # of the file the upload makes


class CompleteUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    part_ids: list[str] = Field(min_length=1, max_length=MAX_UPLOAD_PARTS)
    md5: str | None = Field(None, max_length=64)


class UploadObject(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None = None

    @classmethod
    def from_record(cls, r: UploadRecord, file: FileRecord | None = None) -> UploadObject:
        return cls(
            id=r.id,
            bytes=r.bytes,
            created_at=r.created_at,
            expires_at=r.expires_at,
            filename=r.filename,
            purpose=r.purpose,
            status="pending" if r.status == "completing" else r.status,  # type: ignore[arg-type]
            file=FileObject.from_record(file) if file is not None else None,
        )


class UploadPartObject(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str

    @classmethod
    def from_record(cls, p: PartRecord) -> UploadPartObject:
        return cls(id=p.id, created_at=p.created_at, upload_id=p.upload_id)
