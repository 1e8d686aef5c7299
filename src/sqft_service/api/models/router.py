"""``GET /v1/models``, ``GET /v1/models/{model}``, ``DELETE /v1/models/{model}`` (OpenAI's routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..openapi import error_responses
from .protocol import DeletedModel, Model, ModelList
from .service import ModelService

router = APIRouter(tags=["models"])


def _service(request: Request) -> ModelService:
    return request.app.state.model_service


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    return ModelList(data=[Model.from_entry(e) for e in _service(request).list()])


# `{model:path}`: fine-tuned ids contain ':' and base references may be paths with '/'.
@router.get("/v1/models/{model:path}", response_model=Model, responses=error_responses(404))
def retrieve_model(request: Request, model: str) -> Model:
    return Model.from_entry(_service(request).get(model))


# 403: a base model (only fine-tuned models can be deleted).
@router.delete("/v1/models/{model:path}", response_model=DeletedModel, responses=error_responses(403, 404))
def delete_model(request: Request, model: str) -> DeletedModel:
    return DeletedModel(id=_service(request).delete(model))
