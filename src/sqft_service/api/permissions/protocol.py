"""OpenAI's checkpoint permissions: a fine-tuned model shared with other projects."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...store.permissions import PermissionRecord

ProjectName = Annotated[str, Field(min_length=1, max_length=64)]


class PermissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project_ids: list[ProjectName] = Field(min_length=1, max_length=100)


class Permission(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str

    @classmethod
    def of(cls, record: PermissionRecord) -> Permission:
        return cls(id=record.id, created_at=record.created_at, project_id=record.project_id)


class PermissionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Permission]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedPermission(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool = True
