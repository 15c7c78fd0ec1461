"""The simulated model: a deterministic answer that names the instance it came from.

A token is a whitespace-separated word. The answer is cut into pieces of one word plus the
whitespace after it, so the streamed deltas concatenate to exactly the non-streamed text.

Offered tools, the model calls one (with the smallest arguments its schema accepts) when
the user spoke last; given a tool's result, it answers with that result, so a test sees
the result went back as context; asked for JSON, it answers with the smallest instance of
the schema.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from simulator.schema import minimal_instance

_PIECE = re.compile(r"\S+\s*")
# The schema of JSON mode without a schema (OpenAI json_object, Ollama "json").
ANY_OBJECT = {"type": "object"}


def count_words(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts/blocks with text
    (an Anthropic tool_result block counts with the text of its own content)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [_part_text(part) for part in content if isinstance(part, dict)]
        return "\n".join(t for t in texts if t)
    return ""


def _part_text(part: dict[str, Any]) -> str:
    if part.get("type") == "tool_result":
        return text_of(part.get("content"))
    text = part.get("text", "")
    return text if isinstance(text, str) else ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model was told to call, and the JSON schema of its arguments."""

    name: str
    parameters: Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ChatCall:
    """A chat request, whatever protocol it arrived in."""

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text), the system prompt included
    max_tokens: int | None
    stream: bool
    include_usage: bool = False  # OpenAI stream_options.include_usage
    tool: ToolSpec | None = None  # offered, allowed, and the user spoke last: call it
    tool_result: str | None = None  # the last message is a tool's result: its text
    json_schema: Any = None  # structured output asked for ({"type": "object"}: any object)
    received_ns: int = field(default_factory=time.monotonic_ns)

    @property
    def prompt_tokens(self) -> int:
        return sum(count_words(text) for _, text in self.messages)

    @property
    def last_user_text(self) -> str:
        for role, text in reversed(self.messages):
            if role == "user":
                return text
        return ""


Finish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Answer:
    """The pieces a stream sends: the text's words, or the fragments of a tool call's
    arguments (JSON text) when ``tool_call`` is set."""

    pieces: tuple[str, ...]
    prompt_tokens: int
    finish: Finish
    tool_call: ToolCall | None = None

    @property
    def content(self) -> str:
        """The text, or a tool call's arguments as JSON text."""
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def make_answer(instance: str, call: ChatCall) -> Answer:
    if call.tool is not None:
        arguments = minimal_instance(call.tool.parameters)
        if not isinstance(arguments, dict):
            arguments = {}  # arguments are always an object, whatever the schema says
        # json.dumps puts a space after ":" and ",": the pieces are several fragments.
        fragments = tuple(_PIECE.findall(json.dumps(arguments)))
        return Answer(
            fragments, call.prompt_tokens, "tool_calls", ToolCall(call.tool.name, arguments)
        )
    if call.tool_result is not None:
        text = f"[{instance}] The tool said: {call.tool_result}"
    elif call.json_schema is not None:
        text = json.dumps(_json_answer(instance, call))
    else:
        text = f"[{instance}] You said: {call.last_user_text}"
    return _text_answer(text, call)


def _json_answer(instance: str, call: ChatCall) -> Any:
    value = minimal_instance(call.json_schema)
    if value == {} and call.json_schema == ANY_OBJECT:
        # JSON mode without a schema: any object will do, so it carries the usual echo.
        return {"answer": f"[{instance}] You said: {call.last_user_text}"}
    return value


def _text_answer(text: str, call: ChatCall) -> Answer:
    pieces = _PIECE.findall(text)
    finish: Finish = "stop"
    if call.max_tokens is not None and len(pieces) > call.max_tokens:
        pieces = pieces[: call.max_tokens]
        finish = "length"
    if pieces:
        # A cut answer (or an echo ending in a newline) should not end in whitespace.
        pieces[-1] = pieces[-1].rstrip()
    return Answer(tuple(pieces), call.prompt_tokens, finish)
