"""Anthropic's Messages API: a top-level system prompt, required max_tokens, typed SSE.

The request's translation is in anthropic_messages, the answer's in anthropic_answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tierq.errors import ErrorClass
from worker.backends.anthropic_answer import (
    AnswerShapeError,
    AnswerStream,
    finish_reason,
    fold_blocks,
)
from worker.backends.anthropic_messages import json_tool_of, messages_body
from worker.backends.base import (
    BackendClient,
    ChatAnswer,
    Delta,
    aiter_sse,
    as_int,
    count_of,
    dict_at,
)
from worker.backends.errors import ErrorInfo, class_for_stream_error, error_info_of
from worker.backends.translate import Untranslatable

PATH = "/v1/messages"
API_VERSION = "2023-06-01"


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
        try:
            return messages_body(request, model or self.config.model, stream)
        except Untranslatable as exc:
            # Refused before sending: the request itself is what this protocol cannot carry.
            self.fail(ErrorClass.CLIENT, f"cannot send over the Anthropic protocol: {exc}")

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
        try:
            folded = fold_blocks(content, json_tool_of(request))
        except AnswerShapeError as exc:
            self.malformed(str(exc))
        usage = dict_at(data, "usage")
        return self._answer(
            folded.content, folded.tool_calls, data.get("stop_reason"), usage, data.get("model")
        )

    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[Delta], None],
    ) -> ChatAnswer:
        limits = self.timeout_within(timeout)
        state = AnswerStream(json_tool=json_tool_of(request))
        body = self.body(request, stream=True, model=model)
        with self.translate_errors(limits):
            async with self.open_stream(PATH, body, limits) as response:
                async for event in aiter_sse(response.aiter_lines()):
                    for delta in self._take_event(event.event, event.data, state):
                        on_delta(delta)
                    if state.stopped:
                        break
        if not state.stopped:
            self.malformed("the stream ended before message_stop")
        calls = state.tool_calls or None
        return self._answer(
            state.answer_content(), calls, state.stop_reason, state.usage, state.model
        )

    def _take_event(self, name: str | None, raw: str, state: AnswerStream) -> list[Delta]:
        """Fold one event into ``state``; return the deltas it carries."""
        data = self._load_event(raw)
        kind = data.get("type", name)
        if kind == "error":
            info = error_info_of(data) or ErrorInfo("error in stream")
            self.fail(class_for_stream_error(info), f"in stream: {info.message}", 200)
        try:
            return state.take(str(kind), data)
        except AnswerShapeError as exc:
            self.malformed(str(exc))

    def _load_event(self, raw: str) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            self.malformed("an event's data is not valid JSON")
        if not isinstance(data, dict):
            self.malformed("an event's data is not a JSON object")
        return data

    def _answer(
        self,
        content: str | None,
        tool_calls: list[dict[str, Any]] | None,
        stop_reason: Any,
        usage: dict[str, Any],
        model: Any,
    ) -> ChatAnswer:
        # Cached prompt tokens are counted apart from input_tokens; a prompt is all of them.
        parts = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        prompt = (
            sum(as_int(usage.get(k)) for k in parts)
            if count_of(usage.get("input_tokens")) is not None
            else None
        )
        return ChatAnswer(
            content=content,
            finish_reason=finish_reason(stop_reason, bool(tool_calls)),
            prompt_tokens=prompt,
            completion_tokens=count_of(usage.get("output_tokens")),
            model=str(model or self.config.model),
            tool_calls=tool_calls,
        )
