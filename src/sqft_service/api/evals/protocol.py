"""OpenAI's Evals API objects and bodies (https://platform.openai.com/docs/api-reference/evals): an eval
(the rows' schema and the graders), its runs (a data source, and a model to sample), and their output
items (a row, its sample, each grader's result)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ... import graders
from ...errors import UserError
from ...grader_formula import FUNCTIONS, MAX_FORMULA_CHARS, NAME, FormulaError, formula_names
from ...graders import MODEL_GRADERS, MULTI, SIMILARITY_METRICS, UNOFFERED_METRICS, check_template
from ..inference.protocol import MAX_TOKENS_LIMIT
from ..limits import Metadata
from ..responses.protocol import FunctionTool, TextOptions

MAX_GRADERS = 32
MAX_MULTI_GRADERS = 16
MAX_TEMPLATE_CHARS = 32_768
MAX_NAME_CHARS = 256
Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
# The sample every template may read as ``sample`` (graders/sample_namespace). A ``jsonl`` row's sample
# may be a chat completion (``model``, ``choices``) or just its ``output_text``: none of it is required.
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
        "output_tools": {"type": "array"},
    },
}
# Grader types OpenAI names that this service refuses, and why.
UNOFFERED_GRADERS = {
    "python": "it would run the client's code on the host",
    "endpoint": "it would call out of the service",
}
# Where a multi grader is not offered: an eval reports each testing criterion on its own.
UNOFFERED_IN_EVALS = UNOFFERED_GRADERS | {
    MULTI: "an eval reports each testing criterion's result; combine them from the run's output items "
    "(multi graders are for reinforcement fine-tuning and graders/run)"
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CustomDataSourceConfig(_Strict):
    type: Literal["custom"]
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class StoredCompletionsConfig(_Strict):
    """Rows are the caller's stored chat completions (``store: true``); ``metadata``: the pairs a run's
    ``stored_completions`` source selects by when it names none."""

    type: Literal["stored_completions", "logs"]
    metadata: Metadata | None = None


# The row a stored chat completion becomes (``item``), as an eval over stored completions describes it.
STORED_ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "created_at": {"type": "integer"},
        "input": {"type": "array", "items": {"type": "object"}},
        "tools": {"type": "array"},
        "output": {"type": ["string", "null"]},
        "metadata": {"type": ["object", "null"]},
    },
    "required": ["id", "model", "created_at", "input", "output"],
}


class StringCheckGrader(_Strict):
    type: Literal["string_check"]
    name: Name
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Strict):
    type: Literal["text_similarity"]
    name: Name
    input: Template
    reference: Template
    evaluation_metric: str
    pass_threshold: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _metric(self) -> TextSimilarityGrader:
        if why := UNOFFERED_METRICS.get(self.evaluation_metric):
            raise ValueError(f"`evaluation_metric` '{self.evaluation_metric}' is not offered here: it {why}")
        if self.evaluation_metric not in SIMILARITY_METRICS:
            raise ValueError(f"`evaluation_metric` must be one of {', '.join(SIMILARITY_METRICS)}")
        return self


class InputTextPart(_Strict):
    type: Literal["input_text"]
    text: Template


class InputImagePart(_Strict):
    """An image for an image-text model: a base64 ``data:`` URL, or a template that gives one from the row
    (``{{ item.image_url }}``); read when the row is answered (``inference/images.py``)."""

    type: Literal["input_image"]
    image_url: Template
    detail: Literal["auto", "low", "high"] = "auto"


TemplatePart = Annotated[InputTextPart | InputImagePart, Field(discriminator="type")]
# A template message's content: text, one part, or parts (OpenAI's eval item content).
TemplateContent = Template | TemplatePart | Annotated[list[TemplatePart], Field(min_length=1, max_length=64)]


def content_templates(content: Any) -> list[tuple[str, str]]:
    """``(where, template)`` of a template message's content (``graders.content_templates``)."""
    if isinstance(content, BaseModel):
        content = content.model_dump()
    elif isinstance(content, list):
        content = [part.model_dump() if isinstance(part, BaseModel) else part for part in content]
    return graders.content_templates(content)


class GraderMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: TemplateContent


class GraderSampling(_Strict):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    max_completions_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class LabelModelGrader(_Strict):
    type: Literal["label_model"]
    name: Name
    model: str = Field(max_length=4096)
    input: list[GraderMessage] = Field(min_length=1, max_length=64)
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=2, max_length=64)
    passing_labels: list[str] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _labels(self) -> LabelModelGrader:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("`labels` must be distinct")
        if stray := [label for label in self.passing_labels if label not in self.labels]:
            raise ValueError(f"`passing_labels`: '{stray[0][:64]}' is not one of `labels`")
        return self


class ScoreModelGrader(_Strict):
    type: Literal["score_model"]
    name: Name
    model: str = Field(max_length=4096)
    input: list[GraderMessage] = Field(min_length=1, max_length=64)
    range: tuple[float, float] = (0.0, 1.0)
    pass_threshold: float | None = None
    sampling_params: GraderSampling | None = None

    @model_validator(mode="after")
    def _range(self) -> ScoreModelGrader:
        if not self.range[0] < self.range[1]:
            raise ValueError("`range` is [low, high] with low < high")
        return self


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | LabelModelGrader | ScoreModelGrader, Field(discriminator="type")
]


class MultiGrader(_Strict):
    """Named graders whose scores a formula combines: ``{"graders": {"name": {...}, "email": {...}},
    "calculate_output": "(name + email) / 2"}`` (``grader_formula.py``). ``graders`` may also be one
    grader, which the formula reads by its ``name``."""

    type: Literal["multi"]
    name: Name = "multi"
    graders: dict[str, Grader] = Field(min_length=1, max_length=MAX_MULTI_GRADERS)
    calculate_output: str = Field(min_length=1, max_length=MAX_FORMULA_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _one_grader(cls, data: Any) -> Any:
        graders = data.get("graders") if isinstance(data, dict) else None
        if isinstance(graders, dict) and isinstance(graders.get("type"), str):  # one grader, not a map of them
            return {**data, "graders": {str(graders.get("name")): graders}}
        return data

    @model_validator(mode="after")
    def _formula(self) -> MultiGrader:
        for key in self.graders:
            if not NAME.fullmatch(key) or key in FUNCTIONS:
                raise ValueError(
                    f"`graders`: '{key[:64]}' is not a name a formula can read (letters, digits and _, not "
                    "starting with a digit, nor a function's name)"
                )
        try:
            names = formula_names(self.calculate_output)
        except FormulaError as exc:
            raise ValueError(f"`calculate_output`: {exc}") from None
        if stray := sorted(names - set(self.graders)):
            raise ValueError(
                f"`calculate_output`: the formula reads `{stray[0]}`, which is not one of `graders` "
                f"({', '.join(self.graders)})"
            )
        return self


GraderOrMulti = Annotated[
    StringCheckGrader | TextSimilarityGrader | LabelModelGrader | ScoreModelGrader | MultiGrader,
    Field(discriminator="type"),
]


def grader_templates(at: str, grader: Any) -> list[tuple[str, str]]:
    """``(param, template)`` for every template of a grader (``at``: where the body holds it)."""
    if grader.type == MULTI:
        return [t for key, g in grader.graders.items() for t in grader_templates(f"{at}.graders.{key}", g)]
    if grader.type in MODEL_GRADERS:
        return [
            (f"{at}.input[{j}].content{where}", text)
            for j, m in enumerate(grader.input)
            for where, text in content_templates(m.content)
        ]
    return [(f"{at}.input", grader.input), (f"{at}.reference", grader.reference)]


def _type_of(value: Any) -> str | None:
    """A body part's ``type`` when it is an object with a text ``type`` (before pydantic checks the rest)."""
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def refuse_unoffered(grader: Any, at: str, *, multi: bool = True) -> None:
    """A ValueError naming ``at.type`` for a grader type this service does not offer (before pydantic's
    own error, which could only say the type is not one of those it knows). ``multi``: whether a multi
    grader is offered there (not in an eval; never inside another multi grader)."""
    kind = _type_of(grader) or ""
    if why := (UNOFFERED_GRADERS if multi else UNOFFERED_IN_EVALS).get(kind):
        raise ValueError(f"`{at}.type`: '{kind}' graders are not offered here: {why}")
    graders = grader.get("graders") if kind == MULTI else None
    if isinstance(graders, dict):  # a map of graders by name, or one grader
        for where, sub in [(f"{at}.graders", graders)] if _type_of(graders) else _under(f"{at}.graders", graders):
            if _type_of(sub) == MULTI:
                raise ValueError(f"`{where}.type`: a multi grader's graders are not multi graders")
            refuse_unoffered(sub, where, multi=False)


def _under(at: str, graders: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(f"{at}.{key}", sub) for key, sub in graders.items()]


def check_grader_templates(grader: Any, at: str) -> None:
    """A ValueError naming the template of ``grader`` that does not parse or reads another name."""
    for param, text in grader_templates(at, grader):
        try:
            check_template(text, param)
        except UserError as exc:
            raise ValueError(f"`{param}`: {exc.message}") from None


class CreateEvalRequest(_Strict):
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = None
    data_source_config: Annotated[CustomDataSourceConfig | StoredCompletionsConfig, Field(discriminator="type")]
    testing_criteria: list[Grader] = Field(min_length=1, max_length=MAX_GRADERS)

    @model_validator(mode="before")
    @classmethod
    def _offered(cls, data: Any) -> Any:
        if isinstance(data, dict):
            criteria = data.get("testing_criteria")
            for i, grader in enumerate(criteria if isinstance(criteria, list) else []):
                refuse_unoffered(grader, f"testing_criteria[{i}]", multi=False)
        return data

    @model_validator(mode="after")
    def _graders(self) -> CreateEvalRequest:
        names = [g.name for g in self.testing_criteria]
        if dup := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"`testing_criteria`: two graders are named '{dup[:64]}'; each name must be distinct")
        for i, grader in enumerate(self.testing_criteria):
            check_grader_templates(grader, f"testing_criteria[{i}]")
        return self


class UpdateEvalRequest(_Strict):
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = None


class EvalObject(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    created_at: int
    metadata: dict[str, str] | None = None


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool = True
    eval_id: str


# ------------------------------------------------------------------ runs
class ContentRow(_Strict):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileContentSource(_Strict):
    type: Literal["file_content"]
    content: list[ContentRow] = Field(min_length=1)


class FileIdSource(_Strict):
    type: Literal["file_id"]
    id: str = Field(max_length=128)


class StoredCompletionsSource(_Strict):
    """The caller's stored chat completions, oldest first: those of ``model``, with every ``metadata``
    pair, created in [``created_after``, ``created_before``] (unix seconds), at most ``limit``."""

    type: Literal["stored_completions"]
    model: str | None = Field(None, max_length=4096)
    metadata: Metadata | None = None
    created_after: int | None = None
    created_before: int | None = None
    limit: int | None = Field(None, ge=1)


Source = Annotated[FileContentSource | FileIdSource, Field(discriminator="type")]
CompletionsSource = Annotated[FileContentSource | FileIdSource | StoredCompletionsSource, Field(discriminator="type")]


class TemplateMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: TemplateContent


class TemplateInput(_Strict):
    type: Literal["template"]
    template: list[TemplateMessage] = Field(min_length=1, max_length=64)


class ItemReferenceInput(_Strict):
    type: Literal["item_reference"]
    item_reference: str = Field(pattern=r"^item\.[A-Za-z0-9_.]+$", max_length=256)


class SamplingParams(_Strict):
    """What each sample is generated with; a field left out takes chat/completions' default."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class JsonlDataSource(_Strict):
    type: Literal["jsonl"]
    source: Source


class CompletionsDataSource(_Strict):
    """``model`` answers each row's messages; without it, a ``stored_completions`` source's own answers
    are graded."""

    type: Literal["completions"]
    model: str | None = Field(None, max_length=4096)
    input_messages: Annotated[TemplateInput | ItemReferenceInput, Field(discriminator="type")] | None = None
    sampling_params: SamplingParams | None = None
    source: CompletionsSource

    @model_validator(mode="after")
    def _sampled_or_stored(self) -> CompletionsDataSource:
        if self.model is None and self.source.type != "stored_completions":
            why = "the model that answers the rows (only stored completions are graded on their own answers)"
            raise ValueError(f"`data_source.model`: {why}")
        if self.model is None and (self.input_messages is not None or self.sampling_params is not None):
            raise ValueError("`data_source.input_messages`: messages and sampling are for a `model` to answer")
        return self

    def chat_sampling(self) -> dict[str, Any]:
        return self.sampling_params.model_dump(exclude_none=True) if self.sampling_params else {}


class ResponsesSamplingParams(_Strict):
    """A ``responses`` run's sampling, in Responses' spelling (``text.format``, flat function tools)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None

    def as_chat(self) -> dict[str, Any]:
        """The same sampling as chat/completions fields (a response is the chat answer of its turns)."""
        out = self.model_dump(exclude_none=True, include={"temperature", "top_p", "seed", "max_completion_tokens"})
        if self.text is not None and self.text.response_format is not None and self.text.format.type != "text":
            out["response_format"] = self.text.response_format.model_dump(by_alias=True, exclude_none=True)
        if self.tools:
            out["tools"] = [t.as_chat() for t in self.tools]
        return out


class ResponsesDataSource(_Strict):
    """``model`` answers each row as ``POST /v1/responses`` would: the chat answer of its messages."""

    type: Literal["responses"]
    model: str = Field(max_length=4096)
    input_messages: Annotated[TemplateInput | ItemReferenceInput, Field(discriminator="type")] | None = None
    sampling_params: ResponsesSamplingParams | None = None
    source: Source

    def chat_sampling(self) -> dict[str, Any]:
        return self.sampling_params.as_chat() if self.sampling_params else {}


class CreateRunRequest(_Strict):
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = None
    data_source: Annotated[JsonlDataSource | CompletionsDataSource | ResponsesDataSource, Field(discriminator="type")]

    @model_validator(mode="before")
    @classmethod
    def _stored_responses(cls, data: Any) -> Any:
        source = data.get("data_source") if isinstance(data, dict) else None
        if isinstance(source, dict) and _type_of(source.get("source")) == "responses":
            raise ValueError(
                "`data_source.source.type`: stored responses are not offered as rows; store chat completions "
                "(`store: true`) and use a `completions` run over `stored_completions`"
            )
        return data


class ResultCounts(BaseModel):
    total: int
    errored: int
    failed: int
    passed: int


class PerModelUsage(BaseModel):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class PerTestingCriteriaResult(BaseModel):
    testing_criteria: str
    passed: int
    failed: int


class EvalError(BaseModel):
    code: str
    message: str


RunStatus = Literal["queued", "in_progress", "completed", "canceled", "failed"]


class RunObject(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    name: str
    status: RunStatus
    model: str | None = None
    data_source: dict[str, Any]
    created_at: int
    report_url: str
    result_counts: ResultCounts
    per_model_usage: list[PerModelUsage]
    per_testing_criteria_results: list[PerTestingCriteriaResult]
    error: EvalError | None = None
    metadata: dict[str, str] | None = None


class RunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class RunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool = True
    run_id: str


class OutputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
