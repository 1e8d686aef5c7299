"""OpenAI's chat-completion and completion requests (the supported subset) and answers.

Fields this service does not implement (``tools``, ``audio``, ...) are refused
with a 400 that names them, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ...config import MAX_SEED
from ...inference.spec import Choice, TokenLogprob

MAX_TOKENS_LIMIT = 4096
MAX_CHOICES = 8
MAX_STOPS = 4
# A list of prompts is answered prompt after prompt; lm-eval-harness sends its batch as one such list.
MAX_PROMPTS = 64
MAX_PROMPT_TOKENS = 32768  # a prompt of token ids; the model's context is checked when it is answered
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's bounds
MAX_LOGIT_BIASES = 300  # OpenAI's bound
MAX_SCHEMA_CHARS = 65536  # a structured output's JSON schema, as JSON


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str = Field(max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Token id (as a JSON key, a string) -> a bias added to its logit at every step.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIASES
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"a key must be a token id, not {key[:32]!r}")
        return v

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), b) for k, b in (self.logit_bias or {}).items() if b)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("a stop sequence must not be empty")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=MAX_SCHEMA_CHARS)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the answer is always held to the schema, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's structured outputs: ``text`` (free), ``json_object`` (any JSON object), ``json_schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    _grammar: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _build_grammar(self) -> ResponseFormat:
        from ...inference.guided import JSON_OBJECT_SCHEMA, json_grammar

        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is given with `type: json_schema`, and only then")
        if len(json.dumps(self.json_schema.schema_ if self.json_schema else {})) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is over {MAX_SCHEMA_CHARS} characters")
        if self.type != "text":  # built once here: an unsupported schema is a 400 before any model work
            self._grammar = json_grammar(self.json_schema.schema_ if self.json_schema else JSON_OBJECT_SCHEMA)
        return self

    @property
    def grammar(self) -> str | None:
        return self._grammar


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS["chat"])
    response_format: ResponseFormat | None = None

    @property
    def grammar(self) -> str | None:
        """What structured outputs hold the answer to; None: free text."""
        return self.response_format.grammar if self.response_format else None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return v

    @property
    def scored(self) -> int | None:
        """How many likeliest tokens each answer token lists; None: no log-probabilities asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]


class CompletionRequest(_Sampling):
    # Text, texts, token ids or lists of them (as OpenAI's; lm-eval-harness sends token ids).
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # 0: nothing generated (with `echo`, a prompt scored: the legacy API's way).
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS["completion"])
    echo: bool = False

    @property
    def scored(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, choices: list[Choice]) -> Usage:
        completion = sum(c.completion_tokens for c in choices)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, scores: Sequence[TokenLogprob]) -> ChatLogprobs:
        return cls(
            content=[
                ChatTokenLogprob(
                    token=s.token,
                    logprob=s.logprob or 0.0,  # an answer's tokens are all predicted
                    bytes=list(s.bytes),
                    top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in s.top],
                )
                for s in scores
            ]
        )


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, model: str, n_prompt: int, choices: list[Choice]) -> ChatCompletion:
        return cls(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=None if c.logprobs is None else ChatLogprobs.of(c.logprobs),
                )
                for i, c in enumerate(choices)
            ],
            usage=Usage.of(n_prompt, choices),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, scores: Sequence[TokenLogprob], start: int) -> CompletionLogprobs:
        """``scores`` of tokens whose text begins at ``start`` in the choice's text, one after another."""
        offsets = []
        for s in scores:
            offsets.append(start)
            start += s.width
        return cls(
            tokens=[s.token for s in scores],
            token_logprobs=[s.logprob for s in scores],
            top_logprobs=[None if s.logprob is None else {t: lp for t, _, lp in s.top} for s in scores],
            text_offset=offsets,
        )

    @classmethod
    def of_choice(cls, choice: Choice) -> CompletionLogprobs | None:
        """An echoed prompt's tokens, then the answer's."""
        if choice.logprobs is None:
            return None
        prompt = cls.of(choice.prompt_logprobs or (), 0)
        answer = cls.of(choice.logprobs, len(choice.prompt_text or ""))
        return cls(**{k: getattr(prompt, k) + getattr(answer, k) for k in cls.model_fields})


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, model: str, n_prompt: int, choices: list[Choice]) -> Completion:
        """OpenAI's indexing: the choices of prompt i are i*n .. i*n+n-1."""
        return cls(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=(c.prompt_text or "") + c.text,
                    finish_reason=c.finish_reason,
                    logprobs=CompletionLogprobs.of_choice(c),
                )
                for i, c in enumerate(choices)
            ],
            usage=Usage.of(n_prompt, choices),
        )


def chat_chunk(
    cid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    logprobs: ChatLogprobs | None = None,
) -> dict[str, Any]:
    scores = None if logprobs is None else logprobs.model_dump()
    choice = {"index": index, "delta": delta, "logprobs": scores, "finish_reason": finish}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(
    cid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish: str | None,
    logprobs: CompletionLogprobs | None = None,
) -> dict[str, Any]:
    scores = None if logprobs is None else logprobs.model_dump()
    choice = {"index": index, "text": text, "logprobs": scores, "finish_reason": finish}
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
