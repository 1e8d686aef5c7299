"""OpenAI's model objects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from .service import ModelEntry


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions: where a fine-tuned model lies and which job made it (None for a base model).
    path: str | None = None
    fine_tuning_job_id: str | None = None

    @classmethod
    def from_entry(cls, e: ModelEntry) -> Model:
        return cls(
            id=e.id,
            created=e.created,
            owned_by=e.owned_by,
            path=str(e.path) if e.path else None,
            fine_tuning_job_id=e.job.id if e.job else None,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
