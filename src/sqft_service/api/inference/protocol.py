"""OpenAI's chat-completion and completion requests (the supported subset) and answers.

Fields this service does not implement (``audio``, ``modalities``, ...) are refused
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
from ...inference.images import MAX_IMAGES
from ...inference.spec import Choice, TokenLogprob
from ...tool_calls import CallParser, finish_reason, new_call_id
from ..limits import Metadata

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


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str  # a base64 ``data:`` URL (inference/images.py: the service fetches nothing)
    # "high": the processor's pan-and-scan crops beside the whole image (Gemma 3), where it has them.
    detail: Literal["auto", "low", "high"] = "auto"
    _image: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _read(self) -> ImageURL:
        from ...inference.images import read_image

        self._image = read_image(self.url)  # the header: a bad image is a 400 before any model work
        return self

    @property
    def image(self) -> Any:
        return self._image


class ImagePart(BaseModel):
    """An image for an image-text model (``inference/images.py``); a text-only model answers 400."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


MAX_TOOLS = 128  # OpenAI's bound


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_SCHEMA_CHARS)  # a JSON object, as text (OpenAI's form)

    @field_validator("arguments")
    @classmethod
    def _object(cls, v: str) -> str:
        try:
            parsed = json.loads(v)
        except ValueError:
            raise ValueError("`arguments` must be a JSON object, as text") from None
        if not isinstance(parsed, dict):
            raise ValueError("`arguments` must be a JSON object, as text")
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant's calls
    tool_call_id: str | None = Field(None, max_length=256)  # the call a tool message answers

    @model_validator(mode="after")
    def _fields_of_role(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has `tool_calls`")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a `tool` message has a `tool_call_id` (the call it answers), and only it")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a `{self.role}` message needs `content`")
        if self.images and self.role != "user":
            raise ValueError(f"images are sent in `user` messages, not `{self.role}` ones")
        return self

    @property
    def images(self) -> list[ImageURL]:
        return [p.image_url for p in self.content or () if isinstance(p, ImagePart)]

    def as_dict(self) -> dict[str, Any]:
        """The message in OpenAI's chat form as ``tool_calls.template_messages`` takes it (a message with
        images: content parts ``{"type": "text", "text"}`` and ``{"type": "image", "image", "detail"}``,
        as processors' chat templates take them)."""
        if self.images:
            parts = [
                {"type": "text", "text": p.text}
                if isinstance(p, TextPart)
                else {"type": "image", "image": p.image_url.image, "detail": p.image_url.detail}
                for p in self.content
            ]
            return {"role": self.role, "content": parts}
        text = self.content if isinstance(self.content, str | None) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_SCHEMA_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # a required call always fits its schema, strict or not

    @field_validator("parameters")
    @classmethod
    def _supported(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from ...inference.guided import json_grammar

        if v:  # a call held to it (`tool_choice`) needs the grammar: a bad one is a 400 now
            if v.get("type") != "object":  # as OpenAI's: arguments are an object ({} or none: no arguments)
                raise ValueError('the arguments\' schema must say `"type": "object"`')
            if len(json.dumps(v)) > MAX_SCHEMA_CHARS:
                raise ValueError(f"the schema is over {MAX_SCHEMA_CHARS} characters")
            json_grammar(v)
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


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
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # OpenAI's stored completions: the request and its answer kept (GET /v1/chat/completions, evals).
    store: bool = False
    metadata: Metadata | None = None
    _call_grammar: str | None = PrivateAttr(None)

    @field_validator("messages")
    @classmethod
    def _results_answer_calls(cls, v: list[Message]) -> list[Message]:
        if (count := sum(len(m.images) for m in v)) > MAX_IMAGES:
            raise ValueError(f"{count} images: a request takes at most {MAX_IMAGES}")
        called: set[str] = set()
        for i, m in enumerate(v):
            called |= {c.id for c in m.tool_calls or ()}
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(f"messages[{i}]: `tool_call_id` {m.tool_call_id!r} answers no earlier tool call")
        return v

    @field_validator("tools")
    @classmethod
    def _distinct(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError("two functions have the same name")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(cls, v: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools")
        if v is not None and not tools:
            raise ValueError("`tool_choice` needs `tools`")
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"{v.function.name!r} is not one of `tools`")
        return v

    @model_validator(mode="after")
    def _metadata_is_stored(self) -> ChatCompletionRequest:
        if self.metadata is not None and not self.store:
            raise ValueError("`metadata`: it is kept with a stored completion, so it needs `store: true`")
        return self

    def stored_request(self) -> dict[str, Any]:
        """What a stored completion keeps of its request: the messages and tools as sent."""
        return self.model_dump(mode="json", exclude_none=True, include={"messages", "tools"})

    @model_validator(mode="after")
    def _call_held(self) -> ChatCompletionRequest:
        from ...tool_calls import call_grammar

        if self.tools and self.tool_choice != "none" and self.grammar is not None:
            raise ValueError("`response_format` with `tools` is not supported: send `tool_choice: none`, or no format")
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if named is not None or self.tool_choice == "required":  # each schema was checked with its tool
            tools = [t.model_dump() for t in self.tools or ()]
            self._call_grammar = call_grammar(tools, named, self.parallel_tool_calls)
        return self

    @property
    def grammar(self) -> str | None:
        """What the answer is held to: a required call, structured outputs, or None (free text)."""
        if self._call_grammar is not None:
            return self._call_grammar
        return self.response_format.grammar if self.response_format else None

    @property
    def call_parser(self) -> CallParser | None:
        """How the answer's calls are read; None: it is text (no tools, or `tool_choice: none`)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return CallParser(frozenset(t.function.name for t in self.tools), self.parallel_tool_calls)

    def conversation(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and the tools (OpenAI's chat form) the prompt is rendered from."""
        return [m.as_dict() for m in self.messages], [t.model_dump() for t in self.tools] if self.tools else None

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
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    @classmethod
    def of(cls, text: str, parser: CallParser | None) -> ChatMessage:
        """The answer as a message: its calls (of ``parser``'s tools) as ``tool_calls``."""
        content, calls = parser.split(text) if parser else (text, [])
        if not calls:
            return cls(content=text)
        made = [ToolCall(id=new_call_id(), function=FunctionCall.model_construct(**c)) for c in calls]
        return cls(content=content, tool_calls=made)


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
    def of(cls, model: str, n_prompt: int, choices: list[Choice], parser: CallParser | None = None) -> ChatCompletion:
        """``parser``: the request's tools, whose calls in an answer become its ``tool_calls``."""
        out = []
        for i, c in enumerate(choices):
            message = ChatMessage.of(c.text, parser)
            out.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish_reason(message.tool_calls or [], c.finish_reason),
                    logprobs=None if c.logprobs is None else ChatLogprobs.of(c.logprobs),
                )
            )
        return cls(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            choices=out,
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
