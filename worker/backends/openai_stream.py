"""Folding an OpenAI chat-completions stream into one answer, as the chunks arrive.

Text and refusal deltas are joined; tool calls arrive in pieces keyed by their ``index``
(id, type and function name first, then the argument text in fragments; a custom tool's
call has its name and free-text input under ``custom``) and are put together in order;
logprob entries are appended; fields a server adds to deltas (vLLM's
``reasoning_content``) are joined when they are text.

Servers differ in how they cut a tool call: OpenAI and vLLM send the id, type and name once,
llama.cpp repeats them (and the legacy ``function_call``) in every piece. The pieces passed
on are OpenAI's: id, type and name on a call's first piece only, then its new text, so a
client that joins pieces (the OpenAI SDK's stream helper) gets the call once.

The delta passed on is the chunk's delta, with the chunk's logprobs (which OpenAI puts
beside the delta, in the choice) under ``logprobs``: the API puts them back in the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import ChatAnswer, Delta, count_of

CARRIED = ("content", "refusal", "tool_calls")
# The text fields of a tool call, by its type, joined from its pieces.
TEXT_OF_CALL = {"function": ("name", "arguments"), "custom": ("name", "input")}


@dataclass
class StreamState:
    chunks: int = 0
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None

    def take(self, choice: dict[str, Any]) -> Delta | None:
        """Fold one chunk's choice in; the delta to pass on, if it carries anything."""
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("logprobs"), dict):
            for key, entries in choice["logprobs"].items():
                if isinstance(entries, list):
                    self.logprobs.setdefault(key, []).extend(entries)
        delta = choice.get("delta") or {}
        if not isinstance(delta.get("content"), str | None):
            raise TypeError("content is not text")
        if delta.get("content"):
            self.content.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        pieces = [p for p in map(self._take_tool_call, delta.get("tool_calls") or []) if p]
        for key, value in delta.items():
            if key not in (*CARRIED, "role") and isinstance(value, str):
                self.extra[key] = self.extra.get(key, "") + value
        passed = {
            k: v
            for k, v in delta.items()
            if k not in ("role", "tool_calls", "function_call") and v not in (None, "", [])
        }
        if pieces:
            passed["tool_calls"] = pieces
        if isinstance(choice.get("logprobs"), dict) and any(choice["logprobs"].values()):
            passed["logprobs"] = choice["logprobs"]
        return passed or None

    def _take_tool_call(self, piece: Any) -> dict[str, Any] | None:
        """Fold one piece of a tool call in; the piece to pass on, in OpenAI's shape."""
        if not isinstance(piece, dict) or not isinstance(piece.get("index", 0), int):
            raise TypeError("a tool call piece is not an object with an index")
        index = piece.get("index", len(self.tool_calls))
        call = self.tool_calls.get(index)
        first = call is None
        if call is None:
            # A custom tool's call (free-text input) says so on its first piece.
            kind = "custom" if piece.get("type") == "custom" or "custom" in piece else "function"
            text = dict.fromkeys(TEXT_OF_CALL[kind], "")
            call = self.tool_calls[index] = {"id": "", "type": kind, kind: text}
        if isinstance(piece.get("id"), str) and piece["id"]:
            call["id"] = piece["id"]
        kind, name_key, text_key = call["type"], *TEXT_OF_CALL[call["type"]]
        body = piece.get(kind) or {}
        name = body.get(name_key)
        if isinstance(name, str) and name != call[kind][name_key]:
            call[kind][name_key] += name  # a name in pieces; a repeated one is the same name
        added = body.get(text_key) if isinstance(body.get(text_key), str) else ""
        call[kind][text_key] += added
        if first:
            return {"index": index, "id": call["id"], "type": kind,
                    kind: {name_key: call[kind][name_key], text_key: added}}  # fmt: skip
        return {"index": index, kind: {text_key: added}} if added else None

    def answer(self, configured_model: str) -> ChatAnswer:
        usage = self.usage or {}
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return ChatAnswer(
            content="".join(self.content) if self.content or not calls else None,
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=count_of(usage.get("prompt_tokens")),
            completion_tokens=count_of(usage.get("completion_tokens")),
            model=str(self.model or configured_model),
            tool_calls=calls or None,
            refusal="".join(self.refusal) if self.refusal else None,
            logprobs=self.logprobs or None,
            extra=self.extra,
        )
