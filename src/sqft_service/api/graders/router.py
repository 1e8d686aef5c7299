"""``/v1/fine_tuning/alpha/graders`` (OpenAI's Graders API): ``validate`` and ``run`` one grader."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..openapi import error_responses
from .protocol import RunGraderRequest, RunGraderResponse, ValidateGraderRequest, ValidateGraderResponse
from .service import GraderService

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])


def _service(request: Request) -> GraderService:
    return request.app.state.grader_service


# 404: a model grader's judge the caller can't use.
@router.post("/validate", response_model=ValidateGraderResponse, responses=error_responses(404))
def validate_grader(request: Request, body: ValidateGraderRequest) -> ValidateGraderResponse:
    return ValidateGraderResponse(grader=_service(request).validate(body))


# 503: the engine's queue is full (a model grader's judge runs on it).
@router.post("/run", response_model=RunGraderResponse, responses=error_responses(404, 503))
async def run_grader(request: Request, body: RunGraderRequest) -> RunGraderResponse:
    return await _service(request).run(body)
