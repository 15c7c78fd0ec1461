"""OpenAI-compatible chat completions: vLLM, TGI, llama.cpp, Ollama's /v1, OpenAI itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import BackendClient, ChatAnswer, aiter_sse, as_int, dict_at
from worker.backends.errors import ErrorInfo, class_for_stream_error, error_info_of

PATH = "/v1/chat/completions"
# Set by tierq for every call; a client's own values would fight the configuration.
MANAGED_KEYS = frozenset({"model", "stream", "stream_options"})


@dataclass
class _StreamState:
    """What a stream has said so far; usage arrives last, when the server sends it."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None


class OpenAIClient(BackendClient):
    liveness_path = "/v1/models"

    def headers(self) -> dict[str, str]:
        if self._secret is None:
            return {}
        return {"authorization": f"Bearer {self._secret}"}

    def body(
        self, request: dict[str, Any], stream: bool, model: str | None = None
    ) -> dict[str, Any]:
        body = {k: v for k, v in request.items() if k not in MANAGED_KEYS}
        body["model"] = model or self.config.model
        if stream:
            # Without include_usage a stream carries no token counts at all.
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    async def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        data = await self.post_json(
            PATH, self.body(request, stream=False, model=model), self.timeout_within(timeout)
        )
        message, finish_reason = self._first_choice(data)
        usage = dict_at(data, "usage")
        return ChatAnswer(
            content=_text(message.get("content")) or _text(message.get("refusal")),
            finish_reason=finish_reason or "stop",
            prompt_tokens=as_int(usage.get("prompt_tokens")),
            completion_tokens=as_int(usage.get("completion_tokens")),
            model=str(data.get("model") or self.config.model),
        )

    def _first_choice(self, data: Any) -> tuple[dict[str, Any], str | None]:
        if not isinstance(data, dict):
            self.malformed("not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            self.malformed("no choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            self.malformed("choices[0].message missing")
        if not isinstance(message.get("content"), str | None):
            self.malformed("choices[0].message.content is not text")
        finish = choices[0].get("finish_reason")
        return message, finish if isinstance(finish, str) else None

    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[str], None],
    ) -> ChatAnswer:
        limits = self.timeout_within(timeout)
        state = _StreamState()
        done = False
        body = self.body(request, stream=True, model=model)
        with self.translate_errors(limits):
            async with self.open_stream(PATH, body, limits) as response:
                async for event in aiter_sse(response.aiter_lines()):
                    if event.data.strip() == "[DONE]":
                        done = True
                        break
                    delta = self._take_chunk(event.data, state)
                    if delta:
                        on_delta(delta)
        if not done and state.finish_reason is None:
            self.malformed("the stream ended before the answer was complete")
        return self._streamed_answer(state)

    def _take_chunk(self, data: str, state: _StreamState) -> str | None:
        """Fold one chunk into ``state``; return its text delta, if any."""
        try:
            chunk = json.loads(data)
        except ValueError:
            self.malformed("a stream chunk is not valid JSON")
        if not isinstance(chunk, dict):
            self.malformed("a stream chunk is not a JSON object")
        if "error" in chunk or chunk.get("object") == "error":
            # Servers report failures after the 200 inside the stream.
            info = error_info_of(chunk) or ErrorInfo("error in stream")
            self.fail(class_for_stream_error(info), f"in stream: {info.message}", 200)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            self.malformed("a stream chunk has no choices")
        state.model = state.model or chunk.get("model")
        if isinstance(chunk.get("usage"), dict):
            state.usage = chunk["usage"]
        if not choices:
            return None  # the usage-only chunk at the end
        return self._take_choice(choices[0], state)

    def _take_choice(self, choice: Any, state: _StreamState) -> str | None:
        if not isinstance(choice, dict):
            self.malformed("a stream choice is not a JSON object")
        delta = choice.get("delta")
        if not isinstance(delta, dict | None):
            self.malformed("a stream choice's delta is not a JSON object")
        if isinstance(choice.get("finish_reason"), str):
            state.finish_reason = choice["finish_reason"]
        content = (delta or {}).get("content")
        if not isinstance(content, str | None):
            self.malformed("a stream delta's content is not text")
        if content:
            state.parts.append(content)
        return content

    def _streamed_answer(self, state: _StreamState) -> ChatAnswer:
        usage = state.usage or {}
        return ChatAnswer(
            content="".join(state.parts),
            finish_reason=state.finish_reason or "stop",
            prompt_tokens=as_int(usage.get("prompt_tokens")),
            # A server that ignores include_usage: one delta is about one token.
            completion_tokens=as_int(usage.get("completion_tokens")) or len(state.parts),
            model=str(state.model or self.config.model),
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
