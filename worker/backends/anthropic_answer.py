"""Anthropic answers in OpenAI's shape, whole or streamed event by event.

Text blocks are the content; ``tool_use`` blocks are tool calls (id, name, the input as
JSON text); the ``json_tool`` block (see anthropic_messages) is the JSON answer, given as
content. Streamed, a tool_use block's start is the first OpenAI tool-call piece and its
``input_json_delta`` fragments are the argument pieces; the JSON answer's fragments are
content deltas. Blocks of other kinds (thinking, server tools) carry nothing OpenAI's chat
answer has a place for.

Shape errors raise ``AnswerShapeError``; the client reports them as a malformed answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import Delta

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class AnswerShapeError(ValueError):
    """The answer is not what the Messages API sends."""


def finish_reason(stop_reason: Any, tool_calls: bool) -> str:
    """OpenAI's finish reason. A stop for the JSON answer tool alone is a plain stop: the
    client asked for JSON, not for a tool call."""
    reason = stop_reason if isinstance(stop_reason, str) else "end_turn"
    if reason == "tool_use" and not tool_calls:
        return "stop"
    return FINISH_REASONS.get(reason, reason)


def tool_call(block: dict[str, Any], arguments: str) -> dict[str, Any]:
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": arguments},
    }


@dataclass(frozen=True)
class Folded:
    content: str | None
    tool_calls: list[dict[str, Any]] | None


def fold_blocks(content: list[Any], json_tool: str | None) -> Folded:
    """A whole answer's content blocks as OpenAI content and tool calls."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            raise AnswerShapeError("a content block is not an object")
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            if not isinstance(block.get("input"), dict):
                raise AnswerShapeError("a tool_use block without an input object")
            arguments = json.dumps(block["input"])
            if block.get("name") == json_tool:
                texts.append(arguments)
            else:
                calls.append(tool_call(block, arguments))
    return Folded("".join(texts) if texts or not calls else None, calls or None)


@dataclass
class _Block:
    """A content block being streamed: where its pieces go."""

    kind: str  # text, tool (a tool call), json (the JSON answer), other
    tool_index: int = -1
    start_input: Any = None
    fragments: int = 0  # non-empty input_json_delta fragments received


@dataclass
class AnswerStream:
    """The events of one streamed answer folded into OpenAI deltas and the whole answer."""

    json_tool: str | None = None
    started: bool = False
    stopped: bool = False
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    blocks: dict[int, _Block] = field(default_factory=dict)

    def take(self, kind: str, data: dict[str, Any]) -> list[Delta]:
        """Fold one event (not an error event) in; the deltas it carries."""
        if not self.started and kind != "message_start":
            raise AnswerShapeError(f"the stream began with {kind!r}, not message_start")
        if kind == "message_start":
            self._start(data)
        elif kind == "content_block_start":
            return self._block_start(data)
        elif kind == "content_block_delta":
            return self._block_delta(data)
        elif kind == "content_block_stop":
            return self._block_stop(data)
        elif kind == "message_delta":
            self._message_delta(data)
        elif kind == "message_stop":
            self.stopped = True
        # ping and event types added later carry nothing.
        return []

    def answer_content(self) -> str | None:
        return "".join(self.content) if self.content or not self.tool_calls else None

    def _start(self, data: dict[str, Any]) -> None:
        message = data.get("message")
        if not isinstance(message, dict):
            raise AnswerShapeError("message_start without a message")
        self.started = True
        self.model = message.get("model")
        if isinstance(message.get("usage"), dict):
            self.usage |= message["usage"]

    def _block_start(self, data: dict[str, Any]) -> list[Delta]:
        block = data.get("content_block")
        if not isinstance(block, dict):
            raise AnswerShapeError("content_block_start without a content_block")
        index = _index_of(data)
        kind = block.get("type")
        if kind == "text":
            self.blocks[index] = _Block("text")
            return self._text(block.get("text"))
        if kind != "tool_use":
            self.blocks[index] = _Block("other")
            return []
        if block.get("name") == self.json_tool:
            self.blocks[index] = _Block("json", start_input=block.get("input"))
            return []
        self.blocks[index] = _Block("tool", len(self.tool_calls), block.get("input"))
        self.tool_calls.append(tool_call(block, ""))
        # A fresh copy: the kept call's arguments grow, the delta given away must not.
        first = {"index": len(self.tool_calls) - 1, **tool_call(block, "")}
        return [{"tool_calls": [first]}]

    def _block_delta(self, data: dict[str, Any]) -> list[Delta]:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            raise AnswerShapeError("content_block_delta without a delta")
        # A server that sends no content_block_start (older or simpler ones) streams text.
        block = self.blocks.setdefault(_index_of(data), _Block("text"))
        if delta.get("type") == "text_delta":
            return self._text(delta.get("text"))
        if delta.get("type") == "input_json_delta":
            return self._input_json(block, delta.get("partial_json"))
        return []

    def _block_stop(self, data: dict[str, Any]) -> list[Delta]:
        """A tool_use block whose input came whole in its start (no fragments) gives it now."""
        block = self.blocks.get(_index_of(data))
        if block is None or block.kind not in ("tool", "json") or block.fragments:
            return []
        start = block.start_input if isinstance(block.start_input, dict) else {}
        return self._input_json(block, json.dumps(start))

    def _text(self, text: Any) -> list[Delta]:
        if not isinstance(text, str) or not text:
            return []
        self.content.append(text)
        return [{"content": text}]

    def _input_json(self, block: _Block, fragment: Any) -> list[Delta]:
        if not isinstance(fragment, str):
            raise AnswerShapeError("an input_json_delta without partial_json text")
        if not fragment or block.kind not in ("tool", "json"):
            return []  # the API's first fragment of a block is empty
        block.fragments += 1
        if block.kind == "json":
            self.content.append(fragment)
            return [{"content": fragment}]
        self.tool_calls[block.tool_index]["function"]["arguments"] += fragment
        return [{"tool_calls": [{"index": block.tool_index, "function": {"arguments": fragment}}]}]

    def _message_delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            self.stop_reason = delta["stop_reason"]
        if isinstance(data.get("usage"), dict):
            # Counts in message_delta are cumulative: they replace, not add.
            self.usage |= {k: v for k, v in data["usage"].items() if v is not None}


def _index_of(data: dict[str, Any]) -> int:
    index = data.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        raise AnswerShapeError("a content block event's index is not an integer")
    return index
