"""``/v1/fine_tuning/jobs`` (OpenAI dialect) and the reference service's POST routes."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ...errors import NotFoundError
from ..body import parse_lenient_json, validate_body
from ..limits import CHECKPOINTS_PAGE, EVENTS_PAGE, JOBS_PAGE, metadata_filter
from ..openapi import error_responses, file_response, json_body, metadata_query
from .protocol import (
    CheckpointList,
    CreateFineTuningJobRequest,
    EventList,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    JobIdRequest,
    JobList,
)
from .service import FineTuningService

router = APIRouter(tags=["fine-tuning"])


def _service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning_service


async def _job_id(request: Request) -> str:
    body = validate_body(JobIdRequest, parse_lenient_json(await request.body()))
    return body.fine_tuning_job_id


# 404: `training_file` / `validation_file` names no file of the caller's; 429: SQFT_MAX_UNFINISHED_JOBS.
@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, responses=error_responses(404, 429))
def create_job(request: Request, body: CreateFineTuningJobRequest) -> FineTuningJob:
    return FineTuningJob.from_record(_service(request).create(body))


@router.get("/v1/fine_tuning/jobs", response_model=JobList, openapi_extra=metadata_query("jobs"))
def list_jobs(
    request: Request, after: str | None = None, limit: int = Query(JOBS_PAGE[0], ge=1, le=JOBS_PAGE[1])
) -> JobList:
    """OpenAI's filter: ``metadata[key]=value`` (every pair must match), or ``metadata=null`` for jobs
    without metadata."""
    metadata = metadata_filter(request.query_params)
    jobs, has_more = _service(request).list(after=after, limit=limit, metadata=metadata)
    return JobList(data=[FineTuningJob.from_record(j) for j in jobs], has_more=has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(request: Request, job_id: str) -> FineTuningJob:
    return FineTuningJob.from_record(_service(request).get(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(request: Request, job_id: str) -> FineTuningJob:
    return FineTuningJob.from_record(_service(request).cancel(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob)
def pause_job(request: Request, job_id: str) -> FineTuningJob:
    """Stop a job after its current step, keeping its state; ``/resume`` continues it from there."""
    return FineTuningJob.from_record(_service(request).pause(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob)
def resume_job(request: Request, job_id: str) -> FineTuningJob:
    return FineTuningJob.from_record(_service(request).resume(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=EventList)
def list_events(
    request: Request, job_id: str, after: str | None = None, limit: int = Query(EVENTS_PAGE[0], ge=1, le=EVENTS_PAGE[1])
) -> EventList:
    events, has_more = _service(request).events_of(job_id, after=after, limit=limit)
    return EventList(data=[JobEvent.from_record(e) for e in events], has_more=has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: int = Query(CHECKPOINTS_PAGE[0], ge=1, le=CHECKPOINTS_PAGE[1]),
) -> CheckpointList:
    records, has_more = _service(request).checkpoints_of(job_id, after=after, limit=limit)
    data = [JobCheckpoint.from_record(c, model) for c, model in records]
    return CheckpointList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/v1/fine_tuning/jobs/{job_id}/log", response_class=FileResponse, responses=file_response("text/plain"))
def job_log(request: Request, job_id: str) -> FileResponse:
    """Extension: the job process's log file."""
    path = _service(request).log_path(job_id)
    if not path.is_file():
        raise NotFoundError(f"Job {job_id} has no log yet (it has not started)", param="job_id")
    return FileResponse(path, media_type="text/plain", filename=f"{job_id}.log")


# ---- the reference service's routes (OPEA finetuning_sqft README, section 3.3)
# They parse their body themselves (api/body.py: unquoted ids); JOB_ID_BODY documents it.
JOB_ID_BODY = json_body(JobIdRequest)
JOB_ID_ROUTE = {"responses": error_responses(404), "openapi_extra": JOB_ID_BODY}


@router.post("/v1/fine_tuning/jobs/retrieve", response_model=FineTuningJob, **JOB_ID_ROUTE)
async def retrieve_job_ref(request: Request) -> FineTuningJob:
    job_id = await _job_id(request)
    return FineTuningJob.from_record(_service(request).get(job_id))


@router.post("/v1/fine_tuning/jobs/cancel", response_model=FineTuningJob, **JOB_ID_ROUTE)
async def cancel_job_ref(request: Request) -> FineTuningJob:
    job_id = await _job_id(request)
    return FineTuningJob.from_record(_service(request).cancel(job_id))


@router.post("/v1/finetune/list_checkpoints", response_model=list[JobCheckpoint], **JOB_ID_ROUTE)
async def list_checkpoints_ref(request: Request) -> list[JobCheckpoint]:
    job_id = await _job_id(request)
    records, _ = _service(request).checkpoints_of(job_id, after=None, limit=1000)
    return [JobCheckpoint.from_record(c, model) for c, model in records]
