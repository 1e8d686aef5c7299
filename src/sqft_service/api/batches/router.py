"""``/v1/batches``: routes only parse and delegate to :class:`BatchService` on ``app.state``."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ...errors import NotFoundError
from ..limits import JOBS_PAGE
from ..openapi import error_responses, file_response
from .protocol import BatchList, BatchObject, CreateBatchRequest
from .service import BatchService

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _service(request: Request) -> BatchService:
    return request.app.state.batch_service


def _object(service: BatchService, job) -> BatchObject:
    return BatchObject.from_record(job, *service.progress(job))


# 404: no such input file; 429: the project has as many unfinished jobs as it may.
@router.post("", response_model=BatchObject, responses=error_responses(404, 429))
def create_batch(request: Request, body: CreateBatchRequest) -> BatchObject:
    service = _service(request)
    return _object(service, service.create(body))


@router.get("", response_model=BatchList)
def list_batches(
    request: Request, after: str | None = None, limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1])
) -> BatchList:
    service = _service(request)
    jobs, has_more = service.list(after=after, limit=limit)
    data = [_object(service, job) for job in jobs]
    return BatchList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{batch_id}", response_model=BatchObject)
def retrieve_batch(request: Request, batch_id: str) -> BatchObject:
    service = _service(request)
    return _object(service, service.get(batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(request: Request, batch_id: str) -> BatchObject:
    service = _service(request)
    return _object(service, service.cancel(batch_id))


@router.get("/{batch_id}/log", response_class=FileResponse, responses=file_response("text/plain"))
def batch_log(request: Request, batch_id: str) -> FileResponse:
    """Extension: the batch job process's log file."""
    path = _service(request).log_path(batch_id)
    if not path.is_file():
        raise NotFoundError(f"Batch {batch_id} has no log yet (it has not started)", param="batch_id")
    return FileResponse(path, media_type="text/plain", filename=f"{batch_id}.log")
