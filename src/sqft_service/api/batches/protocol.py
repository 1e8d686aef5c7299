"""OpenAI's Batch object and create body (https://platform.openai.com/docs/api-reference/batch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...jobs.kinds import batch_deadline
from ...store.jobs import JobRecord
from ..files.protocol import ExpiresAfter
from ..limits import Metadata


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: str = Field(max_length=128)
    completion_window: str = Field("24h", max_length=16)
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = None  # of the output and error files


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """OpenAI's batch ``usage``: the prompt and generated tokens of the answered requests."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int

    @classmethod
    def of(cls, tokens: dict[str, int]) -> BatchUsage:
        i, o = int(tokens.get("input_tokens", 0)), int(tokens.get("output_tokens", 0))
        return cls(input_tokens=i, output_tokens=o, total_tokens=i + o)


class BatchError(BaseModel):
    code: str | None = None
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None = None

    @classmethod
    def from_record(cls, job: JobRecord, counts: dict[str, int], tokens: dict[str, int]) -> BatchObject:
        """``counts`` and ``tokens``: the job's result's, or while it runs its latest progress event's."""
        result = job.result or {}
        error = job.error or {}
        status = _STATUS.get(job.status, "in_progress")
        if job.status == "running" and job.cancel_requested:
            status = "cancelling"
        expired = job.status == "succeeded" and bool(result.get("expired"))
        if expired:
            status = "expired"
        ended = job.finished_at
        failure = BatchError(code=error.get("code"), message=error.get("message", ""), param=error.get("param"))
        return cls(
            id=job.id,
            endpoint=job.config["endpoint"],
            errors=BatchErrors(data=[failure]) if job.status == "failed" else None,
            input_file_id=job.config["input_file_id"],
            status=status,  # type: ignore[arg-type]
            output_file_id=result.get("output_file_id"),
            error_file_id=result.get("error_file_id"),
            created_at=job.created_at,
            in_progress_at=job.started_at,
            expires_at=batch_deadline(job.config, job.created_at),
            finalizing_at=ended if status == "completed" else None,
            completed_at=ended if status == "completed" else None,
            failed_at=ended if status == "failed" else None,
            expired_at=ended if expired else None,
            cancelled_at=ended if job.status == "cancelled" else None,
            request_counts=RequestCounts(**counts),
            usage=BatchUsage.of(tokens),
            metadata=job.metadata,
        )


# Job statuses as OpenAI's batch statuses: a batch waiting for a slot has not started (its file was
# checked when it was created).
_STATUS = {
    "validating_files": "validating",
    "queued": "validating",
    "paused": "validating",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
