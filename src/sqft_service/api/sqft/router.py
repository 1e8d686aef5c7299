"""SQFT routes of the reference service (extract a sub-adapter, merge) plus sparsify, and the operations
those requests become (``/v1/finetune/operations``: list, retrieve, cancel, events, log)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel

from ...errors import NotFoundError
from ...store.jobs import JobRecord
from ..body import parse_lenient_json, validate_body
from ..fine_tuning.protocol import EventList, JobEvent
from ..limits import EVENTS_PAGE, OPERATIONS_PAGE
from ..openapi import error_responses, file_response, json_body
from .protocol import (
    EvaluateRequest,
    Evaluation,
    ExtractAdapterRequest,
    MergeAdapterRequest,
    MergedModel,
    Operation,
    OperationList,
    SparseModel,
    SparsifyRequest,
    SubAdapter,
)
from .service import SqftService

router = APIRouter(tags=["sqft"])

# 202 (`wait: false`, or the wait ran out); 404: the job or file the body names; 409: that job has not
# succeeded, or the sparse output name is taken (a cancelled operation is a 409 too); 429: the project
# has SQFT_MAX_UNFINISHED_JOBS jobs not yet ended.
ASYNC_RESPONSES = {
    202: {"model": Operation, "description": "Accepted: the operation runs (`wait: false`)"},
    **error_responses(404, 409, 429),
}


def _service(request: Request) -> SqftService:
    return request.app.state.sqft_service


def _wants_async(request: Request, wait: bool) -> bool:
    prefer = request.headers.get("prefer", "")
    return not wait or "respond-async" in prefer.replace(" ", "").lower().split(",")


async def _answer(request: Request, op: JobRecord, wait: bool, result_model: type[BaseModel]) -> object:
    """The result once the operation ends (the reference's behaviour), or 202 with the operation."""
    service = _service(request)
    if _wants_async(request, wait):
        return JSONResponse(status_code=202, content=Operation.from_record(op).model_dump(mode="json"))
    op = await service.wait(op.id, request.is_disconnected)
    if not op.is_final:  # waited past the limit (or the client left): hand over the operation
        return JSONResponse(status_code=202, content=Operation.from_record(op).model_dump(mode="json"))
    return result_model(**service.result_of(op))


# Extract and merge parse their body themselves (api/body.py: unquoted ids); openapi_extra documents it.
@router.post(
    "/v1/finetune/extract_adapter",
    response_model=SubAdapter,
    responses=ASYNC_RESPONSES,
    openapi_extra=json_body(ExtractAdapterRequest),
)
async def extract_adapter(request: Request) -> object:
    body = validate_body(ExtractAdapterRequest, parse_lenient_json(await request.body()))
    op = _service(request).extract(body.fine_tuning_job_id, body.sub_adapter_version, body.custom_config)
    return await _answer(request, op, body.wait, SubAdapter)


@router.post(
    "/v1/finetune/merge_adapter",
    response_model=MergedModel,
    responses=ASYNC_RESPONSES,
    openapi_extra=json_body(MergeAdapterRequest),
)
async def merge_adapter(request: Request) -> object:
    body = validate_body(MergeAdapterRequest, parse_lenient_json(await request.body()))
    op = _service(request).merge(body.fine_tuning_job_id, body.version, body.gguf)
    return await _answer(request, op, body.wait, MergedModel)


# The reference README's merge example posts to this misspelt path; accept it so the example works.
@router.post("/v1/ffinetune/merge_adapter", response_model=MergedModel, include_in_schema=False)
async def merge_adapter_typo(request: Request) -> object:
    return await merge_adapter(request)


@router.post("/v1/finetune/sparsify", response_model=SparseModel, responses=ASYNC_RESPONSES)
async def sparsify(request: Request, body: SparsifyRequest) -> object:
    """Prune a base model (magnitude or Wanda; unstructured or N:M) into a directory usable as a job's model."""
    op = _service(request).sparsify(body)
    return await _answer(request, op, body.wait, SparseModel)


@router.post("/v1/finetune/evaluate", response_model=Evaluation, responses=ASYNC_RESPONSES)
async def evaluate(request: Request, body: EvaluateRequest) -> object:
    """Score base models and fine-tuned models (``ft:…``) on the same records of an uploaded file: response
    loss, perplexity, token accuracy and, with ``generate``, exact / contains match of greedy answers."""
    op = _service(request).evaluate(body, request.app.state.model_service)
    return await _answer(request, op, body.wait, Evaluation)


@router.get("/v1/finetune/operations", response_model=OperationList)
def list_operations(
    request: Request,
    after: str | None = None,
    limit: int = Query(OPERATIONS_PAGE[0], ge=1, le=OPERATIONS_PAGE[1]),
    kind: str | None = Query(None, pattern="^(extract|merge|sparsify|evaluate)$"),
) -> OperationList:
    ops, has_more = _service(request).list(kind=kind, after=after, limit=limit)
    return OperationList(data=[Operation.from_record(op) for op in ops], has_more=has_more)


@router.get("/v1/finetune/operations/{operation_id}", response_model=Operation)
def retrieve_operation(request: Request, operation_id: str) -> Operation:
    return Operation.from_record(_service(request).get(operation_id))


@router.post("/v1/finetune/operations/{operation_id}/cancel", response_model=Operation)
def cancel_operation(request: Request, operation_id: str) -> Operation:
    return Operation.from_record(_service(request).cancel(operation_id))


@router.get("/v1/finetune/operations/{operation_id}/events", response_model=EventList)
def list_operation_events(
    request: Request,
    operation_id: str,
    after: str | None = None,
    limit: int = Query(EVENTS_PAGE[0], ge=1, le=EVENTS_PAGE[1]),
) -> EventList:
    events, has_more = _service(request).events_of(operation_id, after=after, limit=limit)
    return EventList(data=[JobEvent.from_record(e) for e in events], has_more=has_more)


@router.get(
    "/v1/finetune/operations/{operation_id}/log", response_class=FileResponse, responses=file_response("text/plain")
)
def operation_log(request: Request, operation_id: str) -> FileResponse:
    path = _service(request).log_path(operation_id)
    if not path.is_file():
        raise NotFoundError(f"Operation {operation_id} has no log yet (it has not started)", param="operation_id")
    return FileResponse(path, media_type="text/plain", filename=f"{operation_id}.log")
