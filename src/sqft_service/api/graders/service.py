"""Grade one sample (OpenAI's ``graders/run``): a string or similarity grader here, a model grader's
judge on the API's engine (the same request an eval run's judge makes, ``graders.judge_request``)."""

from __future__ import annotations

import asyncio
import time

from ...errors import ServiceError
from ...graders import (
    MODEL_GRADERS,
    MULTI,
    GradingError,
    TemplateVariableError,
    combine,
    grade,
    judge_request,
    model_verdict,
    render_messages,
    sample_namespace,
    sub_graders,
)
from ..inference.protocol import ChatCompletionRequest
from ..inference.service import InferenceService
from ..models.service import ModelService
from .protocol import RunErrors, RunGraderRequest, RunGraderResponse, RunMetadata, ValidateGraderRequest


class GraderService:
    def __init__(self, models: ModelService, inference: InferenceService) -> None:
        self.models, self.inference = models, inference

    def validate(self, req: ValidateGraderRequest) -> dict:
        """The grader as the service holds it (404 naming the ``model`` of a judge the caller can't use)."""
        grader = req.grader.model_dump(mode="json", exclude_none=True)
        for key, sub in sub_graders(grader).items():
            if sub["type"] in MODEL_GRADERS:
                self.models.spec(sub["model"], "grader.model" if sub is grader else f"grader.graders.{key}.model")
        return grader

    async def run(self, req: RunGraderRequest) -> RunGraderResponse:
        """The grader's reward for the sample: a multi grader's formula over its graders' scores (each in
        ``sub_rewards``); a grader that could not grade sets its error flag and the reward is 0."""
        grader = self.validate(req)
        t0 = time.monotonic()
        item, sample = req.item or {}, sample_namespace(req.model_sample, None)
        errors, usage, scores, parts = RunErrors(), {}, {}, sub_graders(grader)
        for key, sub in parts.items():
            score = await self._score(sub, item, sample, errors, usage)
            if score is not None:
                scores[key] = score
        reward = 0.0
        if len(scores) == len(parts):
            try:
                reward = combine(grader, scores)
            except GradingError:  # the formula has no value for these scores (a division by zero…)
                errors.other_error = True
        tokens = sum(u["total_tokens"] for u in usage.values()) if usage else None
        metadata = RunMetadata(
            name=grader["name"],
            type=grader["type"],
            errors=errors,
            execution_time=round(time.monotonic() - t0, 6),
            scores=scores if grader["type"] == MULTI else {grader["name"]: scores.get(grader["name"], 0.0)},
            token_usage=tokens,
        )
        sub_rewards = scores if grader["type"] == MULTI else {}
        return RunGraderResponse(
            reward=reward, metadata=metadata, sub_rewards=sub_rewards, model_grader_token_usage_per_model=usage
        )

    async def _score(
        self, grader: dict, item: dict, sample: dict, errors: RunErrors, usage: dict[str, dict[str, int]]
    ) -> float | None:
        """One (not multi) grader's score of the sample, or None with its error flag set."""
        try:
            if grader["type"] not in MODEL_GRADERS:  # off the event loop: a similarity of long texts takes a while
                return (await asyncio.to_thread(grade, grader, item, sample))[0]
            messages = render_messages(grader["input"], item, sample)
            chat = ChatCompletionRequest.model_validate(judge_request(grader, messages))
            try:
                n_prompt, (choice,) = await self.inference.chat_answer(chat)
            except ServiceError as exc:  # the judge could not answer (its context, a busy engine)
                errors.model_grader_server_error, errors.model_grader_server_error_details = True, exc.message
                return None
            used = usage.setdefault(
                grader["model"], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
            )
            used["prompt_tokens"] += n_prompt
            used["completion_tokens"] += choice.completion_tokens
            used["total_tokens"] += n_prompt + choice.completion_tokens
            return model_verdict(grader, choice.text)[0]
        except TemplateVariableError:
            errors.invalid_variable_error = True
        except GradingError:
            if grader["type"] in MODEL_GRADERS:
                errors.model_grader_parse_error = True
            else:
                errors.other_error = True  # a text over the similarity bound
        return None
