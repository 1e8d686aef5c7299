"""``/v1/files``: routes only parse and delegate to :class:`FileService` on ``app.state``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from ...errors import InvalidRequestError
from ..limits import FILES_PAGE
from ..openapi import error_responses, file_response, multipart_body
from .protocol import MAX_EXPIRY_S, MIN_EXPIRY_S, UPLOAD_PURPOSES, FileDeleted, FileList, FileObject, form_expires_after
from .service import FileService
from .upload import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])


def _service(request: Request) -> FileService:
    return request.app.state.file_service


# The body is parsed by api/files/upload.py, not by FastAPI's form support (which spools files to the
# system temp dir and reads all of it before any limit applies); this documents the form it takes.
_UPLOAD_FORM = multipart_body(
    "file",
    purpose={"type": "string", "enum": list(UPLOAD_PURPOSES), "default": "fine-tune"},
    **{
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY_S, "maximum": MAX_EXPIRY_S},
    },
)


# 429: the project already stores SQFT_MAX_FILES files.
@router.post("", response_model=FileObject, responses=error_responses(429), openapi_extra=_UPLOAD_FORM)
async def upload_file(request: Request) -> FileObject:
    service = _service(request)
    try:
        received = await receive_upload(
            request.headers.get("content-type"),
            request.stream(),
            staging_dir=service.store.files_dir,
            max_file_bytes=service.max_upload_bytes,
        )
    except ClientDisconnect:
        raise InvalidRequestError("the client disconnected during the upload", param="file") from None
    try:
        fields = received.fields
        if unknown := sorted(k for k in fields if k != "purpose" and not k.startswith("expires_after[")):
            raise InvalidRequestError(
                f"Unknown form field `{unknown[0][:64]}`: an upload takes `file`, `purpose` and `expires_after`",
                param=unknown[0][:64],
            )
        record = await run_in_threadpool(
            service.accept,
            received.staged,
            filename=received.filename,
            purpose=fields.get("purpose", "fine-tune"),
            sha256=received.sha256,
            expires_after=form_expires_after(fields),
        )
    finally:
        received.staged.unlink(missing_ok=True)  # accept() moved or removed it; this covers a cancelled request
    request.app.state.metrics.upload_bytes.inc(record.bytes)
    return FileObject.from_record(record)


@router.get("", response_model=FileList)
def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(FILES_PAGE[0], ge=1, le=FILES_PAGE[1]),
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    records, has_more = _service(request).list(purpose=purpose, after=after, limit=limit, order=order)
    data = [FileObject.from_record(r) for r in records]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(request: Request, file_id: str) -> FileObject:
    return FileObject.from_record(_service(request).get(file_id))


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(409))
def delete_file(request: Request, file_id: str) -> FileDeleted:
    _service(request).delete(file_id)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=FileResponse, responses=file_response("application/octet-stream"))
def file_content(request: Request, file_id: str) -> FileResponse:
    record = _service(request).get(file_id)
    return FileResponse(record.path, filename=record.filename, media_type="application/octet-stream")
