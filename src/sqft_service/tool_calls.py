"""Function calling ("tools"): how tool definitions, calls and results enter a chat prompt, and how an
answer is read back into calls. Shared by training (chat records with ``tools``) and serving (chat
requests with ``tools``), so a model is asked for calls exactly as it learned to make them.

* A tokenizer whose chat template reads ``tools`` (Qwen 2.5+, Llama 3.1+, Hermes, ...) renders them its
  own way: the tools go to ``apply_chat_template(tools=...)``, calls and results as Hugging Face's chat
  format has them (arguments as objects).
* Any other template (SmolLM2's, most small models') gets Qwen 2.5's / Hermes' plain-text convention:
  the tool signatures in the system prompt inside ``<tools>``, each call an assistant line
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results in a user turn inside
  ``<tool_response>``. Plain text, so every template renders it and training needs nothing new.
* An answer's calls are the ``<tool_call>`` blocks in it, or the whole answer when it is one JSON
  object naming a tool (Llama 3.x's bare JSON, with ``arguments`` or ``parameters``); text that does
  not parse stays the answer's text, as written.
* A call the request requires (``tool_choice`` ``required`` or a named function) is generated under a
  grammar: ``<tool_call>`` blocks whose JSON is the function's name and its ``parameters`` schema
  (llguidance, as structured outputs), so it always parses and its arguments always fit.

Pure Python (llguidance imported when a grammar is built): the API validates requests with it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
# The JSON a grammar holds a call to is spaced as json.dumps writes it, which is how calls are rendered
# in training: a fine-tuned model's own calls and the ones a grammar forces look the same.
CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def reads_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` itself (Hugging Face's convention)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object (the API carries them as a JSON string)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw  # validated before it gets here; kept as written if not
    return raw


def call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _arguments(arguments)}, ensure_ascii=False)}\n{CLOSE}"


def assistant_text(message: dict[str, Any]) -> str:
    """An assistant message as plain text: its content, then each of its calls as a ``<tool_call>`` block."""
    parts = [message["content"]] if message.get("content") else []
    parts += [call_text(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
    return "\n".join(parts)


def _signature(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k)}}


def _turn(message: dict[str, Any], content: str) -> dict[str, Any]:
    turn = {"role": message["role"], "content": content}
    if "weight" in message:
        turn["weight"] = message["weight"]
    return turn


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (OpenAI's chat form, with ``tool_calls`` and ``tool`` turns) and tools as the chat
    template takes them: ``(messages, tools)`` for ``apply_chat_template`` (tools None: not passed).
    An assistant turn keeps its training ``weight`` (templates ignore the key)."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return [_turn(m, m.get("content") or "") for m in messages], None
    if native:
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or () if c.get("id")}
        out = []
        for m in messages:
            turn = _turn(m, m.get("content") or "")
            if m.get("tool_calls"):
                turn["tool_calls"] = [
                    {"id": c.get("id"), "type": "function", "function": {**c["function"], "arguments": args}}
                    for c in m["tool_calls"]
                    for args in [_arguments(c["function"]["arguments"])]
                ]
            if m["role"] == "tool":
                turn["tool_call_id"] = m.get("tool_call_id")
                if m.get("tool_call_id") in names:
                    turn["name"] = names[m["tool_call_id"]]
            out.append(turn)
        return out, [_signature(t) for t in tools] if tools else None
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":  # consecutive results (of parallel calls) share one user turn
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if i > 0 and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m["role"] == "assistant":
            out.append(_turn(m, assistant_text(m)))
        else:
            out.append(_turn(m, m.get("content") or ""))
    if tools:
        listed = "\n".join(json.dumps(_signature(t), ensure_ascii=False) for t in tools)
        block = TOOLS_HEADER + listed + TOOLS_FOOTER
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


@dataclass(frozen=True)
class CallParser:
    """Reads an answer's calls of the request's tools (``parallel``: all of them, else the first)."""

    names: frozenset[str]
    parallel: bool = True

    def _call(self, raw: str) -> dict[str, str] | None:
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}

    def split(self, text: str) -> tuple[str | None, list[dict[str, str]]]:
        """``(content, calls)``: the text around the calls (None when there is none) and each call's
        ``name`` and ``arguments`` (a JSON string). No calls: the text as it is."""
        calls = []
        for block in _BLOCK.finditer(text):
            if (call := self._call(block.group(1))) is None:
                return text, []  # one block that is not a call of these tools: the answer is text
            calls.append(call)
        if calls:
            content = _BLOCK.sub("", text)
            content = content[: content.find(OPEN)] if OPEN in content else content  # a call cut short
            content = content.strip() or None
        elif OPEN not in text and (call := self._call(text.strip())) is not None:
            content, calls = None, [call]
        else:
            return text, []
        return content, calls if self.parallel else calls[:1]


def finish_reason(calls: list[Any], finish: str) -> str:
    """An answer's ``finish_reason``: ``tool_calls`` when it made calls, unless ``max_tokens`` cut it
    (its complete calls are still given; a call cut short is dropped)."""
    return "tool_calls" if calls and finish != "length" else finish


class HeldStream:
    """A streamed answer whose calls are sent whole, once parsed: text is passed on while it cannot be
    part of a call, and held from the first ``<tool_call>`` (or a leading ``{``) to the end."""

    def __init__(self, parser: CallParser) -> None:
        self.parser, self.text, self.sent, self.holding = parser, "", 0, False

    def push(self, piece: str) -> str:
        """The text that can be sent now."""
        self.text += piece
        if self.holding:
            return ""
        rest = self.text[self.sent :]
        start = rest.lstrip()[:1]  # "": nothing but whitespace yet
        if (at := rest.find(OPEN)) >= 0:
            self.holding, ready = True, rest[:at]
        elif self.sent == 0 and start in ("", "{"):
            self.holding, ready = start == "{", ""  # a bare JSON call perhaps: wait for the end
        else:  # keep back an end that may begin "<tool_call>"
            keep = next((k for k in range(min(len(OPEN) - 1, len(rest)), 0, -1) if OPEN.startswith(rest[-k:])), 0)
            ready = rest[: len(rest) - keep]
        self.sent += len(ready)
        return ready

    def finish(self) -> tuple[str, list[dict[str, str]]]:
        """What was held: ``(text to send, calls)``."""
        rest = self.text[self.sent :]
        content, calls = self.parser.split(rest)
        return (content or "") if calls else rest, calls


def call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> str:
    """The llguidance grammar of the calls a request requires: of the function ``name`` (one call), or of
    any of ``tools`` (one, or one or more when ``parallel``). A ValueError says why a schema can't be held."""
    from llguidance import LLMatcher

    from .inference.guided import checked_grammar

    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    schemas = [
        {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for fn in chosen
    ]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": CALL_JSON_OPTIONS}
    more = ' ("\\n" call)*' if parallel and name is None else ""
    lark = f'start: call{more}\ncall: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"\n'
    return checked_grammar(
        lambda: LLMatcher.grammar_from_lark(lark), "a function's `parameters` schema is not supported"
    )
