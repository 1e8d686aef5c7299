"""SQFT routes of the reference service: extract a sub-adapter, merge; plus sparsify (built in here)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..body import parse_lenient_json, validate_body
from .protocol import (
    ExtractAdapterRequest,
    MergeAdapterRequest,
    MergedModel,
    SparseModel,
    SparsifyRequest,
    SubAdapter,
)
from .service import SqftService

router = APIRouter(tags=["sqft"])


def _service(request: Request) -> SqftService:
    return request.app.state.sqft_service


@router.post("/v1/finetune/extract_adapter", response_model=SubAdapter)
async def extract_adapter(request: Request) -> SubAdapter:
    body = validate_body(ExtractAdapterRequest, parse_lenient_json(await request.body()))
    result = _service(request).extract(body.fine_tuning_job_id, body.sub_adapter_version, body.custom_config)
    return SubAdapter(**result)


def _merge(request: Request, body: MergeAdapterRequest) -> MergedModel:
    return MergedModel(**_service(request).merge(body.fine_tuning_job_id, body.version))


@router.post("/v1/finetune/merge_adapter", response_model=MergedModel)
async def merge_adapter(request: Request) -> MergedModel:
    body = validate_body(MergeAdapterRequest, parse_lenient_json(await request.body()))
    # The merge waits on a child process for seconds to minutes: keep the event loop free.
    return await run_in_threadpool(_merge, request, body)


# The reference README's merge example posts to this misspelt path; accept it so the example works.
@router.post("/v1/ffinetune/merge_adapter", response_model=MergedModel, include_in_schema=False)
async def merge_adapter_typo(request: Request) -> MergedModel:
    return await merge_adapter(request)


@router.post("/v1/finetune/sparsify", response_model=SparseModel)
def sparsify(request: Request, body: SparsifyRequest) -> SparseModel:
    """Prune a base model (magnitude or Wanda; unstructured or N:M) into a directory usable as a job's model."""
    return SparseModel(**_service(request).sparsify(body))
