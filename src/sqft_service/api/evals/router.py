"""``/v1/evals`` (OpenAI's Evals API): evals, their runs and the runs' output items. Routes only parse
and delegate to :class:`EvalService` on ``app.state``."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from ...store.evals import EvalRecord
from ..limits import JOBS_PAGE
from ..openapi import error_responses
from .protocol import (
    CreateEvalRequest,
    CreateRunRequest,
    EvalDeleted,
    EvalList,
    EvalObject,
    OutputItemList,
    RunDeleted,
    RunList,
    RunObject,
    RunStatus,
    UpdateEvalRequest,
)
from .service import EvalService

router = APIRouter(prefix="/v1/evals", tags=["evals"])
Order = Literal["asc", "desc"]


def _service(request: Request) -> EvalService:
    return request.app.state.eval_service


def _eval(record: EvalRecord) -> EvalObject:
    return EvalObject(
        id=record.id,
        name=record.name,
        data_source_config=record.data_source_config,
        testing_criteria=record.testing_criteria,
        created_at=record.created_at,
        metadata=record.metadata,
    )


def _ends(data: list[Any]) -> dict[str, str | None]:
    return {"first_id": data[0].id if data else None, "last_id": data[-1].id if data else None}


@router.post("", response_model=EvalObject, responses=error_responses(404))
def create_eval(request: Request, body: CreateEvalRequest) -> EvalObject:
    return _eval(_service(request).create(body))


@router.get("", response_model=EvalList)
def list_evals(
    request: Request,
    after: str | None = None,
    limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1]),
    order: Order = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> EvalList:
    records, more = _service(request).list(after=after, limit=limit, order=order, order_by=order_by)
    data = [_eval(r) for r in records]
    return EvalList(data=data, has_more=more, **_ends(data))


@router.get("/{eval_id}", response_model=EvalObject, responses=error_responses(404))
def retrieve_eval(request: Request, eval_id: str) -> EvalObject:
    return _eval(_service(request).get(eval_id))


@router.post("/{eval_id}", response_model=EvalObject, responses=error_responses(404))
def update_eval(request: Request, eval_id: str, body: UpdateEvalRequest) -> EvalObject:
    return _eval(_service(request).update(eval_id, body))


# 409: a run of the eval has not ended.
@router.delete("/{eval_id}", response_model=EvalDeleted, responses=error_responses(404, 409))
def delete_eval(request: Request, eval_id: str) -> EvalDeleted:
    _service(request).delete(eval_id)
    return EvalDeleted(eval_id=eval_id)


# 404: no such eval, file or model; 429: the project has as many unfinished jobs as it may.
@router.post("/{eval_id}/runs", response_model=RunObject, responses=error_responses(404, 429))
def create_run(request: Request, eval_id: str, body: CreateRunRequest) -> RunObject:
    service = _service(request)
    return service.run_object(service.create_run(eval_id, body))


@router.get("/{eval_id}/runs", response_model=RunList, responses=error_responses(404))
def list_runs(
    request: Request,
    eval_id: str,
    after: str | None = None,
    limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1]),
    order: Order = "asc",
    status: RunStatus | None = None,
) -> RunList:
    service = _service(request)
    jobs, more = service.list_runs(eval_id, after=after, limit=limit, order=order, status=status)
    data = [service.run_object(j) for j in jobs]
    return RunList(data=data, has_more=more, **_ends(data))


@router.get("/{eval_id}/runs/{run_id}", response_model=RunObject, responses=error_responses(404))
def retrieve_run(request: Request, eval_id: str, run_id: str) -> RunObject:
    service = _service(request)
    return service.run_object(service.run(eval_id, run_id))


@router.post("/{eval_id}/runs/{run_id}", response_model=RunObject, responses=error_responses(404))
def cancel_run(request: Request, eval_id: str, run_id: str) -> RunObject:
    """OpenAI's cancel: stops the run between two chunks of rows; the items graded so far stay."""
    service = _service(request)
    return service.run_object(service.cancel_run(eval_id, run_id))


@router.delete("/{eval_id}/runs/{run_id}", response_model=RunDeleted, responses=error_responses(404, 409))
def delete_run(request: Request, eval_id: str, run_id: str) -> RunDeleted:
    _service(request).delete_run(eval_id, run_id)
    return RunDeleted(run_id=run_id)


@router.get("/{eval_id}/runs/{run_id}/output_items", response_model=OutputItemList, responses=error_responses(404))
def list_output_items(
    request: Request,
    eval_id: str,
    run_id: str,
    after: str | None = None,
    limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1]),
    order: Order = "asc",
    status: Literal["pass", "fail", "error"] | None = None,
) -> OutputItemList:
    return _service(request).output_items(eval_id, run_id, after=after, limit=limit, order=order, status=status)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", responses=error_responses(404))
def retrieve_output_item(request: Request, eval_id: str, run_id: str, output_item_id: str) -> dict[str, Any]:
    return _service(request).output_item(eval_id, run_id, output_item_id)
