"""OpenAI's Responses API (the subset a text model answers): requests, the response object, its events.

A response is one assistant message, or its function calls, generated as a chat completion is (the
same rendering, sampling, structured outputs and tools: ``api/inference``, ``tool_calls.py``), in
Responses' spelling: flat function tools, ``function_call`` output items, ``function_call_output``
input items. Images (``input_image``, as base64 ``data:`` URLs) go to image-text models as chat's
``image_url`` parts (``inference/images.py``). Fields for built-in tools, reasoning, audio or files are
refused with a 400 naming them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, create_model, model_validator

from ...store.ids import new_id
from ...tool_calls import finish_reason, new_call_id
from ..inference.protocol import (
    MAX_SCHEMA_CHARS,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    ChatLogprobs,
    FunctionDefinition,
    JsonSchemaFormat,
    ResponseFormat,
)

MAX_INPUT_ITEMS = 256
MAX_METADATA_KEYS = 16


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's output_text, sent back as it came
    logprobs: list[Any] | None = None  # ... with its scores (``include``)


class InputImage(BaseModel):
    """An image for an image-text model, as a base64 ``data:`` URL (the service fetches nothing)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"

    @model_validator(mode="after")
    def _read(self) -> InputImage:
        from ...inference.images import read_image

        if self.file_id is not None or self.image_url is None:
            raise ValueError("send the image as `image_url`, a base64 `data:` URL (`file_id` images are not read)")
        read_image(self.image_url)  # a bad image is a 400 naming this part
        return self

    def as_chat(self) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": self.image_url, "detail": self.detail}}


ContentPart = Annotated[InputText | InputImage, Field(discriminator="type")]


class InputMessage(BaseModel):
    """``{"role", "content"}`` (``type: "message"`` optional); ``content`` a string, or text and image parts."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None  # an earlier output item sent back
    status: str | None = None

    @model_validator(mode="after")
    def _images_from_users(self) -> InputMessage:
        if self.role != "user" and self.images:
            raise ValueError(f"images are sent in `user` messages, not `{self.role}` ones")
        return self

    @property
    def images(self) -> bool:
        return not isinstance(self.content, str) and any(isinstance(p, InputImage) for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat turn (JSON: a stored response keeps its turns); images as ``image_url`` parts."""
        role = "system" if self.role == "developer" else self.role
        if self.images:
            parts = self.content
            chat = [p.as_chat() if isinstance(p, InputImage) else {"type": "text", "text": p.text} for p in parts]
            return {"role": role, "content": chat}
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": text}

    def listed(self) -> dict[str, Any]:
        turn = self.as_dict()["content"]
        if isinstance(turn, str):
            content = [{"type": "input_text", "text": turn}]
        else:
            content = [
                {"type": "input_text", "text": p["text"]}
                if p["type"] == "text"
                else {"type": "input_image", "image_url": p["image_url"]["url"], "detail": p["image_url"]["detail"]}
                for p in turn
            ]
        return {
            "id": self.id or new_id("msg", "_"),
            "type": "message",
            "role": self.role,
            "status": "completed",
            "content": content,
        }


class FunctionCallItem(BaseModel):
    """A call the model made (an earlier response's output item, sent back with its result)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_SCHEMA_CHARS)
    id: str | None = None
    status: str | None = None

    def listed(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_none=True), "id": self.id or new_id("fc", "_"), "status": "completed"}


class FunctionOutputItem(BaseModel):
    """A call's result."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str
    id: str | None = None
    status: str | None = None

    def listed(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_none=True), "id": self.id or new_id("fco", "_"), "status": "completed"}


def turns_of(items: list[Any]) -> list[dict[str, Any]]:
    """Input items (``InputItem``) as chat turns: a call joins the assistant turn before it; a result is a
    tool turn."""
    turns: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = chat_call(item.model_dump())
            if turns and turns[-1]["role"] == "assistant":
                turns[-1].setdefault("tool_calls", []).append(call)
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionOutputItem):
            turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            turns.append(item.as_dict())
    return turns


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=64)


def _item_type(value: Any) -> str:
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition):
    """Responses' function tool: chat's ``{"type", "function": {...}}`` flattened."""

    type: Literal["function"]

    def as_chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: Responses' flat spelling of chat's ``response_format``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        schema = JsonSchemaFormat(
            name=self.name or "response", schema=self.schema_ or {}, strict=self.strict, description=self.description
        )
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat = Field(default_factory=TextFormat)
    _response_format: ResponseFormat | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _build(self) -> TextOptions:
        # Built (its grammar too) while the request is validated: a bad schema is a 400 naming `text`.
        self._response_format = self.format.as_response_format()
        return self

    @property
    def response_format(self) -> ResponseFormat | None:
        return self._response_format


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str = Field(max_length=4096)
    # None: nothing new (a conversation or previous response answered as it stands).
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=64)
    # A conversation (``/v1/conversations``) whose items come before the input; the input and the answer
    # are added to it when the response ends.
    conversation: Annotated[str, Field(max_length=64)] | ConversationRef | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    text: TextOptions = Field(default_factory=TextOptions)
    stream: bool = False
    store: bool = True
    background: bool = False  # answered later: poll GET /v1/responses/{id}
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=MAX_METADATA_KEYS)
    user: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    # The answer's tokens with their log-probabilities (and the ``top_logprobs`` likeliest at each) in its
    # ``output_text`` part and stream deltas; ``top_logprobs`` alone asks for them too.
    include: list[Literal["message.output_text.logprobs"]] | None = Field(None, max_length=8)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS["chat"])
    # "auto": a conversation too long for the model's context loses its oldest turns (``truncation.py``).
    truncation: Literal["auto", "disabled"] = "disabled"

    @property
    def scored(self) -> bool:
        """Whether the answer's tokens are scored (``include`` or ``top_logprobs``)."""
        return bool(self.include) or self.top_logprobs is not None

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation

    def messages(self) -> list[dict[str, Any]]:
        """The input as chat turns (``turns_of``)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return turns_of(self.input or [])

    def chat_tools(self) -> dict[str, Any]:
        """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as a chat request has them."""
        if not self.tools:
            return {} if self.tool_choice is None else {"tool_choice": self.tool_choice}  # refused there
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        return {
            "tools": [t.as_chat() for t in self.tools],
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }

    def input_items(self) -> list[dict[str, Any]]:
        """The input as OpenAI lists it back (``input_items``): items with ids, messages with text parts."""
        given = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input or []
        return [item.listed() for item in given]


# ``POST /v1/responses/input_tokens`` takes what makes a response's prompt (``model`` is required here:
# its tokenizer counts).
_COUNTED = (
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "conversation",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "truncation",
)
InputTokensRequest = create_model(
    "InputTokensRequest",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (field.annotation, field) for name, field in ResponseRequest.model_fields.items() if name in _COUNTED},
)


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed", "queued", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    usage: Usage | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    text: dict[str, Any]
    previous_response_id: str | None = None
    conversation: dict[str, str] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool
    background: bool = False
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None

    @classmethod
    def begun(cls, response_id: str, req: ResponseRequest) -> Response:
        """The response before any output (a stream's first events carry it)."""
        return cls(
            id=response_id,
            created_at=int(time.time()),
            status="in_progress",
            model=req.model,
            output=[],
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)},
            previous_response_id=req.previous_response_id,
            conversation={"id": req.conversation_id} if req.conversation_id else None,
            metadata=req.metadata or {},
            store=req.store,
            background=req.background,
            user=req.user,
            parallel_tool_calls=req.parallel_tool_calls,
            tool_choice=req.tool_choice.model_dump()
            if isinstance(req.tool_choice, FunctionChoice)
            else req.tool_choice or "auto",
            tools=[t.model_dump(exclude_none=True) for t in req.tools or ()],
            top_logprobs=req.top_logprobs,
            truncation=req.truncation,
        )

    def ended(self, output: list[dict[str, Any]], finish_reason: str, n_prompt: int, n_output: int) -> Response:
        """This response with its output items: ``completed``, or ``incomplete`` when ``max_output_tokens``
        cut it (``finish_reason`` ``tool_calls``: calls made, completed)."""
        done = finish_reason in ("stop", "tool_calls")
        return self.model_copy(
            update={
                "status": "completed" if done else "incomplete",
                "output": output,
                "incomplete_details": None if done else {"reason": "max_output_tokens"},
                "usage": Usage(input_tokens=n_prompt, output_tokens=n_output, total_tokens=n_prompt + n_output),
            }
        )

    @property
    def output_text(self) -> str:
        return "".join(
            part["text"] for item in self.output for part in item.get("content", []) if part["type"] == "output_text"
        )


def message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An assistant message output item; ``logprobs``: its text's tokens scored (``token_logprobs``)."""
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    content = [part] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def token_logprobs(scores: Any) -> list[dict[str, Any]]:
    """Scored tokens (``inference.spec.TokenLogprob``) as Responses' ``logprobs``: chat's, entry for entry."""
    return ChatLogprobs.of(scores).model_dump()["content"]


def call_item(call: dict[str, str], status: str = "completed") -> dict[str, Any]:
    """A function call output item; ``call``: ``name``, ``arguments`` (``tool_calls.CallParser``) and ``call_id``."""
    arguments = call["arguments"] if status == "completed" else ""
    return {
        "type": "function_call",
        "id": call["id"],
        "call_id": call["call_id"],
        "name": call["name"],
        "arguments": arguments,
        "status": status,
    }


def answer_output(
    item_id: str,
    content: str | None,
    parsed: list[dict[str, str]],
    finish: str,
    logprobs: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], str]:
    """An answer's output items, its calls (``parsed`` given item and call ids) and its finish reason:
    its message (when it has text, or made no call; ``logprobs``: its tokens scored), then its calls."""
    calls = [{**c, "id": new_id("fc", "_"), "call_id": new_call_id()} for c in parsed]
    finish = finish_reason(calls, finish)
    status = "incomplete" if finish == "length" else "completed"
    message = [message_item(item_id, content or "", status, logprobs)] if content or not calls else []
    return message + [call_item(c) for c in calls], calls, finish


def chat_call(call: dict[str, str]) -> dict[str, Any]:
    """A call (``call_id``, ``name``, ``arguments``) as a chat assistant turn's ``tool_calls`` entry."""
    return {
        "id": call["call_id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": call["arguments"]},
    }


class InputItemList(BaseModel):
    """A page of items: a response's input items, a conversation's items."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, items: list[dict[str, Any]], more: bool = False) -> InputItemList:
        first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
        return cls(data=items, first_id=first, last_id=last, has_more=more)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
