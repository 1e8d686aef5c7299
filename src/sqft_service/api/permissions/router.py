"""``/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions`` (OpenAI's routes): the
project that owns a fine-tuned model (any ``ft:`` id: adapter, checkpoint, sub-adapter, merged) shares
it with other projects of this service (``SQFT_API_KEY``'s), lists and revokes the shares.

What a share allows is in ``api/models/service.py``: the other project lists and uses the model (and
may download it), never deletes or re-shares it. Only the owning project sees a model's permissions.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from ...errors import InvalidRequestError, NotFoundError
from ..limits import page_of
from ..models.service import ModelService
from ..openapi import error_responses
from ..owner import current_owner
from .protocol import DeletedPermission, Permission, PermissionCreate, PermissionList

router = APIRouter(prefix="/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions", tags=["models"])
ERRORS = error_responses(400, 403, 404)


def _owned(request: Request, model: str):
    service: ModelService = request.app.state.model_service
    return service, service.owned(model, "share", "shared", "model_not_shareable")


@router.post("", response_model=PermissionList, responses=ERRORS)
def create_permissions(request: Request, fine_tuned_model_checkpoint: str, body: PermissionCreate) -> PermissionList:
    projects = request.app.state.projects
    if not projects:
        raise InvalidRequestError(
            "this service has one tenant (no `SQFT_API_KEY` projects): there is no other project to share with",
            param="project_ids",
        )
    service, entry = _owned(request, fine_tuned_model_checkpoint)
    for project in body.project_ids:
        if project not in projects:
            raise InvalidRequestError(f"no project `{project[:64]}` on this service", param="project_ids")
        if project == current_owner():
            raise InvalidRequestError(f"`{project}` is this model's own project", param="project_ids")
    assert entry.job is not None
    granted = service.permissions.grant(entry.id, entry.job.id, list(dict.fromkeys(body.project_ids)))
    data = [Permission.of(r) for r in granted]
    return PermissionList(data=data, first_id=data[0].id, last_id=data[-1].id)


@router.get("", response_model=PermissionList, responses=ERRORS)
def list_permissions(
    request: Request,
    fine_tuned_model_checkpoint: str,
    project_id: str | None = Query(None, max_length=64),
    after: str | None = Query(None, max_length=64),
    limit: int = Query(10, ge=1, le=100),
    order: Literal["ascending", "descending"] = "descending",
) -> PermissionList:
    service, entry = _owned(request, fine_tuned_model_checkpoint)
    records = [r for r in service.permissions.of_model(entry.id) if project_id in (None, r.project_id)]
    what = "permission of this model"
    page, more = page_of(
        records, lambda r: r.id, after=after, limit=limit, newest_first=order == "descending", what=what
    )
    data = [Permission.of(r) for r in page]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return PermissionList(data=data, first_id=first, last_id=last, has_more=more)


@router.delete("/{permission_id}", response_model=DeletedPermission, responses=ERRORS)
def delete_permission(request: Request, fine_tuned_model_checkpoint: str, permission_id: str) -> DeletedPermission:
    service, entry = _owned(request, fine_tuned_model_checkpoint)
    if not service.permissions.revoke(permission_id, entry.id):
        raise NotFoundError(f"no permission `{permission_id}` of this model", param="permission_id")
    return DeletedPermission(id=permission_id)
