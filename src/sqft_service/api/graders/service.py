"""Grade one sample (OpenAI's ``graders/run``): a string or similarity grader here, a model grader's
judge on the API's engine (the same request an eval run's judge makes, ``graders.judge_request``)."""

from __future__ import annotations

import asyncio
import time

from ...errors import ServiceError
from ...graders import (
    GradingError,
    TemplateVariableError,
    grade,
    judge_request,
    model_verdict,
    render_messages,
    sample_namespace,
)
from ..evals.protocol import MODEL_GRADERS
from ..inference.protocol import ChatCompletionRequest
from ..inference.service import InferenceService
from ..models.service import ModelService
from .protocol import RunErrors, RunGraderRequest, RunGraderResponse, RunMetadata, ValidateGraderRequest


class GraderService:
    def __init__(self, models: ModelService, inference: InferenceService) -> None:
        self.models, self.inference = models, inference

    def validate(self, req: ValidateGraderRequest) -> dict:
        """The grader as the service holds it (404 naming ``grader.model`` for a judge the caller can't use)."""
        if req.grader.type in MODEL_GRADERS:
            self.models.spec(req.grader.model, "grader.model")
        return req.grader.model_dump(mode="json", exclude_none=True)

    async def run(self, req: RunGraderRequest) -> RunGraderResponse:
        grader = self.validate(req)
        t0 = time.monotonic()
        item, sample = req.item or {}, sample_namespace(req.model_sample, None)
        errors, usage, score, tokens = RunErrors(), {}, 0.0, None
        try:
            if grader["type"] in MODEL_GRADERS:
                chat = ChatCompletionRequest.model_validate(
                    judge_request(grader, render_messages(grader["input"], item, sample))
                )
                try:
                    n_prompt, (choice,) = await self.inference.chat_answer(chat)
                except ServiceError as exc:  # the judge could not answer (its context, a busy engine)
                    errors.model_grader_server_error, errors.model_grader_server_error_details = True, exc.message
                    raise GradingError(exc.message) from None
                tokens = n_prompt + choice.completion_tokens
                usage[grader["model"]] = {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": choice.completion_tokens,
                    "total_tokens": tokens,
                    "cached_tokens": 0,
                }
                score, _, _ = model_verdict(grader, choice.text)
            else:  # off the event loop: a similarity of long texts takes a while
                score, _ = await asyncio.to_thread(grade, grader, item, sample)
        except TemplateVariableError:
            errors.invalid_variable_error = True
        except GradingError:
            if grader["type"] not in MODEL_GRADERS:
                errors.other_error = True  # a text over the similarity bound
            elif not errors.model_grader_server_error:
                errors.model_grader_parse_error = True
        metadata = RunMetadata(
            name=grader["name"],
            type=grader["type"],
            errors=errors,
            execution_time=round(time.monotonic() - t0, 6),
            scores={grader["name"]: score},
            token_usage=tokens,
        )
        return RunGraderResponse(reward=score, metadata=metadata, model_grader_token_usage_per_model=usage)
