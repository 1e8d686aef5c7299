"""``/v1/files``: routes only parse and delegate to :class:`FileService` on ``app.state``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from .protocol import FileDeleted, FileList, FileObject
from .service import FileService

router = APIRouter(prefix="/v1/files", tags=["files"])


def _service(request: Request) -> FileService:
    return request.app.state.file_service


@router.post("", response_model=FileObject)
def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form("fine-tune")) -> FileObject:
    record = _service(request).upload(file.file, file.filename, purpose)
    return FileObject.from_record(record)


@router.get("", response_model=FileList)
def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
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


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(request: Request, file_id: str) -> FileDeleted:
    _service(request).delete(file_id)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content")
def file_content(request: Request, file_id: str) -> FileResponse:
    record = _service(request).get(file_id)
    return FileResponse(record.path, filename=record.filename, media_type="application/octet-stream")
