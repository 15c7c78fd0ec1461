"""Anthropic's Messages API: a top-level system prompt, required max_tokens, typed SSE."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import (
    BackendClient,
    ChatAnswer,
    Delta,
    aiter_sse,
    as_int,
    count_of,
    dict_at,
    max_tokens_of,
    text_of,
)
from worker.backends.errors import ErrorInfo, class_for_stream_error, error_info_of

PATH = "/v1/messages"
API_VERSION = "2023-06-01"
# Anthropic requires max_tokens; OpenAI-shaped requests often leave it out.
DEFAULT_MAX_TOKENS = 4096
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
SYSTEM_ROLES = ("system", "developer")


@dataclass
class _StreamState:
    started: bool = False
    stopped: bool = False
    parts: list[str] = field(default_factory=list)
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


class AnthropicClient(BackendClient):
    liveness_path = "/v1/models"

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self._secret is not None:
            headers["x-api-key"] = self._secret
        return headers

    def body(
        self, request: dict[str, Any], stream: bool, model: str | None = None
    ) -> dict[str, Any]:
        messages = [m for m in request.get("messages", []) if isinstance(m, dict)]
        system = "\n\n".join(
            text_of(m.get("content")) for m in messages if m.get("role") in SYSTEM_ROLES
        )
        body: dict[str, Any] = {
            "model": model or self.config.model,
            "max_tokens": max_tokens_of(request) or DEFAULT_MAX_TOKENS,
            "messages": _turns([m for m in messages if m.get("role") not in SYSTEM_ROLES]),
        }
        if system:
            body["system"] = system
        if isinstance(request.get("temperature"), int | float):
            body["temperature"] = min(float(request["temperature"]), 1.0)  # OpenAI allows 2
        if request.get("top_p") is not None:
            body["top_p"] = request["top_p"]
        if (stop := request.get("stop")) is not None:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        if stream:
            body["stream"] = True
        return body

    async def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        data = await self.post_json(
            PATH, self.body(request, stream=False, model=model), self.timeout_within(timeout)
        )
        if not isinstance(data, dict) or data.get("type") != "message":
            self.malformed("not a message")
        content = data.get("content")
        if not isinstance(content, list):
            self.malformed("no content list")
        text = "".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
        usage = dict_at(data, "usage")
        return self._answer(text, data.get("stop_reason"), usage, data.get("model"))

    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[Delta], None],
    ) -> ChatAnswer:
        limits = self.timeout_within(timeout)
        state = _StreamState()
        body = self.body(request, stream=True, model=model)
        with self.translate_errors(limits):
            async with self.open_stream(PATH, body, limits) as response:
                async for event in aiter_sse(response.aiter_lines()):
                    delta = self._take_event(event.event, event.data, state)
                    if delta:
                        on_delta({"content": delta})
                    if state.stopped:
                        break
        if not state.stopped:
            self.malformed("the stream ended before message_stop")
        return self._answer("".join(state.parts), state.stop_reason, state.usage, state.model)

    def _take_event(self, name: str | None, raw: str, state: _StreamState) -> str | None:
        """Fold one event into ``state``; return its text delta, if any."""
        data = self._load_event(raw)
        kind = data.get("type", name)
        if kind == "error":
            info = error_info_of(data) or ErrorInfo("error in stream")
            self.fail(class_for_stream_error(info), f"in stream: {info.message}", 200)
        if not state.started and kind != "message_start":
            self.malformed(f"the stream began with {kind!r}, not message_start")
        if kind == "message_start":
            self._take_start(data, state)
        elif kind == "content_block_delta":
            return self._take_delta(data, state)
        elif kind == "message_delta":
            self._take_message_delta(data, state)
        elif kind == "message_stop":
            state.stopped = True
        # ping, content_block_start/stop and event types added later carry no text.
        return None

    def _load_event(self, raw: str) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            self.malformed("an event's data is not valid JSON")
        if not isinstance(data, dict):
            self.malformed("an event's data is not a JSON object")
        return data

    def _take_start(self, data: dict[str, Any], state: _StreamState) -> None:
        message = data.get("message")
        if not isinstance(message, dict):
            self.malformed("message_start without a message")
        state.started = True
        state.model = message.get("model")
        if isinstance(message.get("usage"), dict):
            state.usage |= message["usage"]

    def _take_delta(self, data: dict[str, Any], state: _StreamState) -> str | None:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            self.malformed("content_block_delta without a delta")
        text = delta.get("text") if delta.get("type") == "text_delta" else None
        if isinstance(text, str) and text:
            state.parts.append(text)
            return text
        return None

    def _take_message_delta(self, data: dict[str, Any], state: _StreamState) -> None:
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            state.stop_reason = delta["stop_reason"]
        if isinstance(data.get("usage"), dict):
            # Counts in message_delta are cumulative: they replace, not add.
            state.usage |= {k: v for k, v in data["usage"].items() if v is not None}

    def _answer(self, text: str, stop_reason: Any, usage: dict[str, Any], model: Any) -> ChatAnswer:
        # Cached prompt tokens are counted apart from input_tokens; a prompt is all of them.
        parts = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        prompt = (
            sum(as_int(usage.get(k)) for k in parts)
            if count_of(usage.get("input_tokens")) is not None
            else None
        )
        reason = stop_reason if isinstance(stop_reason, str) else "end_turn"
        return ChatAnswer(
            content=text,
            finish_reason=FINISH_REASONS.get(reason, reason),
            prompt_tokens=prompt,
            completion_tokens=count_of(usage.get("output_tokens")),
            model=str(model or self.config.model),
        )


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as Anthropic turns: user/assistant only, same-role runs merged."""
    turns: list[dict[str, str]] = []
    for message in messages:
        role = "assistant" if message.get("role") == "assistant" else "user"
        text = text_of(message.get("content"))
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return turns
