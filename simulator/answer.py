"""The simulated model: a deterministic answer that names the instance it came from.

A token is a whitespace-separated word. The answer is cut into pieces of one word plus the
whitespace after it, so the streamed deltas concatenate to exactly the non-streamed text.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

_PIECE = re.compile(r"\S+\s*")


def count_words(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts/blocks with text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict)]
        return "\n".join(t for t in texts if isinstance(t, str) and t)
    return ""


@dataclass(frozen=True)
class ChatCall:
    """A chat request, whatever protocol it arrived in."""

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text), the system prompt included
    max_tokens: int | None
    stream: bool
    include_usage: bool = False  # OpenAI stream_options.include_usage
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


@dataclass(frozen=True)
class Answer:
    pieces: tuple[str, ...]
    prompt_tokens: int
    finish: Literal["stop", "length"]

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def make_answer(instance: str, call: ChatCall) -> Answer:
    pieces = _PIECE.findall(f"[{instance}] You said: {call.last_user_text}")
    finish: Literal["stop", "length"] = "stop"
    if call.max_tokens is not None and len(pieces) > call.max_tokens:
        pieces = pieces[: call.max_tokens]
        finish = "length"
    if pieces:
        # A cut answer (or an echo ending in a newline) should not end in whitespace.
        pieces[-1] = pieces[-1].rstrip()
    return Answer(tuple(pieces), call.prompt_tokens, finish)
