"""``GET /v1/models``, ``GET /v1/models/{model}``, ``DELETE /v1/models/{model}`` (OpenAI's routes)."""

from __future__ import annotations

import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from ...errors import NotFoundError
from ..openapi import error_responses, file_response
from .archive import Member, tar_length, tar_stream
from .protocol import DeletedModel, Model, ModelList
from .service import ModelService

router = APIRouter(tags=["models"])


def _service(request: Request) -> ModelService:
    return request.app.state.model_service


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    return ModelList(data=[Model.from_entry(e) for e in _service(request).list()])


# Before the `{model:path}` routes, which would take `/content` as part of a name. Fine-tuned ids have no '/'.
@router.get(
    "/v1/models/{model}/content",
    response_class=StreamingResponse,
    response_model=None,
    responses={**file_response("application/x-tar"), **error_responses(403, 404)},
)
def model_content(
    request: Request,
    model: str,
    file: str | None = Query(None, max_length=1024, description="one file of the model (e.g. model.gguf)"),
) -> FileResponse | StreamingResponse:
    """A fine-tuned model's files (adapter, sub-adapter or merged model) as one tar, or one of them with
    ``?file=``; what it holds is what ``GET /v1/models/{model}`` says lies at ``path``."""
    entry, files = _service(request).model_files(model)
    if file is not None:
        if file not in files:
            listed = ", ".join(list(files)[:20])
            raise NotFoundError(f"`{model}` has no file {file!r}; it has: {listed}", param="file")
        return FileResponse(files[file], filename=files[file].name, media_type="application/octet-stream")
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", entry.id)
    members = [Member.of(f"{folder}/{name}", path) for name, path in files.items()]
    headers = {
        "Content-Disposition": f'attachment; filename="{folder}.tar"',
        "Content-Length": str(tar_length(members)),
    }
    return StreamingResponse(tar_stream(members), media_type="application/x-tar", headers=headers)


# `{model:path}`: fine-tuned ids contain ':' and base references may be paths with '/'.
@router.get("/v1/models/{model:path}", response_model=Model, responses=error_responses(404))
def retrieve_model(request: Request, model: str) -> Model:
    return Model.from_entry(_service(request).get(model))


# 403: a base model (only fine-tuned models can be deleted).
@router.delete("/v1/models/{model:path}", response_model=DeletedModel, responses=error_responses(403, 404))
def delete_model(request: Request, model: str) -> DeletedModel:
    return DeletedModel(id=_service(request).delete(model))
