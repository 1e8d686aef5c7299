"""``/v1/uploads``: routes only parse and delegate to :class:`UploadService` on ``app.state``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ...errors import InvalidRequestError
from ..content_type import require_json
from ..files.upload import receive_upload
from ..openapi import error_responses, multipart_body
from .protocol import CompleteUploadRequest, CreateUploadRequest, UploadObject, UploadPartObject
from .service import UploadService

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
PART_FIELD = "data"


def _service(request: Request) -> UploadService:
    return request.app.state.upload_service


# The part's body is parsed by api/files/upload.py as it streams in (see api/files/router.py).
_PART_FORM = multipart_body(PART_FIELD)


# 429: the project already has as many pending uploads as it may.
@router.post("", response_model=UploadObject, responses=error_responses(429), dependencies=[Depends(require_json)])
def create_upload(request: Request, body: CreateUploadRequest) -> UploadObject:
    return UploadObject.from_record(_service(request).create(body))


# 409: the upload has ended, or it would then hold more bytes than it was created for.
@router.post(
    "/{upload_id}/parts", response_model=UploadPartObject, responses=error_responses(409), openapi_extra=_PART_FORM
)
async def add_part(request: Request, upload_id: str) -> UploadPartObject:
    service = _service(request)
    record = await run_in_threadpool(service.pending, upload_id)  # before a byte of the part is read
    limit = await run_in_threadpool(service.part_limit, record)
    try:
        received = await receive_upload(
            request.headers.get("content-type"),
            request.stream(),
            staging_dir=service.staging_dir,
            max_file_bytes=limit,
            file_field=PART_FIELD,
            too_large=f"the part is over {limit} bytes: parts are at most 64 MiB, and together no more than "
            "the upload's `bytes`",
        )
    except ClientDisconnect:
        raise InvalidRequestError("the client disconnected during the part", param=PART_FIELD) from None
    try:
        part = await run_in_threadpool(service.add_part, upload_id, received.staged, received.size)
    finally:
        received.staged.unlink(missing_ok=True)  # kept by add_part, or refused; this covers a cancelled request
    return UploadPartObject.from_record(part)


@router.post(
    "/{upload_id}/complete",
    response_model=UploadObject,
    responses=error_responses(409, 429),
    dependencies=[Depends(require_json)],
)
def complete_upload(request: Request, upload_id: str, body: CompleteUploadRequest) -> UploadObject:
    record, file = _service(request).complete(upload_id, body.part_ids, body.md5)
    request.app.state.metrics.upload_bytes.inc(file.bytes)
    return UploadObject.from_record(record, file)


@router.post(
    "/{upload_id}/cancel",
    response_model=UploadObject,
    responses=error_responses(409),
    dependencies=[Depends(require_json)],
)
def cancel_upload(request: Request, upload_id: str) -> UploadObject:
    return UploadObject.from_record(_service(request).cancel(upload_id))
