"""OpenAI-compatible chat completions: vLLM, TGI, llama.cpp, Ollama's /v1, OpenAI itself.

The request goes out as the client sent it, fields tierq does not know included (server
extras: ``top_k``, ``min_p``, ``guided_json``, ...); the answer comes back whole: tool
calls, refusal, logprobs, the server's own message fields. A stream is folded into the
same answer as it goes, and counts as one only if the server said it finished (a
``finish_reason``): llama.cpp ends a stream it interrupts with a bare ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from worker.backends.base import (
    BackendClient,
    ChatAnswer,
    Delta,
    aiter_sse,
    count_of,
    dict_at,
    text_of,
)
from worker.backends.errors import (
    BackendError,
    ErrorInfo,
    class_for_stream_error,
    error_info_of,
)
from worker.backends.openai_stream import StreamState

PATH = "/v1/chat/completions"
# Set by tierq for every call; a client's own values would fight the configuration.
MANAGED_KEYS = frozenset({"model", "stream", "stream_options"})
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "refusal"})


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
        if self.config.dialect == "llama.cpp":
            body = _for_llama_cpp(body)
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
        choice, message = self._first_choice(data)
        usage = dict_at(data, "usage")
        finish = choice.get("finish_reason")
        return ChatAnswer(
            content=message.get("content"),
            finish_reason=finish if isinstance(finish, str) else "stop",
            prompt_tokens=count_of(usage.get("prompt_tokens")),
            completion_tokens=count_of(usage.get("completion_tokens")),
            model=str(data.get("model") or self.config.model),
            tool_calls=message.get("tool_calls") or None,
            refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else None,
            logprobs=choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else None,
            extra={k: v for k, v in message.items() if k not in MESSAGE_KEYS and v is not None},
            more_choices=[c for c in data["choices"][1:] if isinstance(c, dict)],
        )

    def _first_choice(self, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
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
        if not isinstance(message.get("tool_calls"), list | None):
            self.malformed("choices[0].message.tool_calls is not a list")
        return choices[0], message

    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[Delta], None],
    ) -> ChatAnswer:
        limits = self.timeout_within(timeout)
        state = StreamState()
        body = self.body(request, stream=True, model=model)
        opened = False
        try:
            with self.translate_errors(limits):
                async with self.open_stream(PATH, body, limits) as response:
                    opened = True
                    async for event in aiter_sse(response.aiter_lines()):
                        if event.data.strip() == "[DONE]":
                            break
                        delta = self._take_chunk(event.data, state)
                        if delta:
                            on_delta(delta)
        except BackendError:
            if opened and not state.chunks:
                await self._said_nothing(request, model, timeout)
            raise
        if state.finish_reason is None:
            if not state.chunks:
                await self._said_nothing(request, model, timeout)
            self.malformed("the stream ended before the server finished the answer")
        return state.answer(self.config.model)

    async def _said_nothing(
        self, request: dict[str, Any], model: str | None, timeout: float | None
    ) -> None:
        """A 200 stream that said nothing at all (and may have been dropped) is how
        llama.cpp answers a prompt longer than its context. The same request unstreamed,
        for one token, tells the truth: it raises the context-length error if that is what
        it was; if it answers, the stream was only cut short (the caller says so)."""
        limit = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
        # On a connection of its own: llama.cpp drops the one that carried the empty stream
        # after saying keep-alive, and the pool would hand that one out again.
        async with httpx.AsyncClient() as http:
            fresh = type(self)(self.config, http)
            await fresh.chat({**request, limit: 1}, model=model, timeout=timeout)

    def _take_chunk(self, data: str, state: StreamState) -> Delta | None:
        """Fold one chunk into ``state``; return its delta, if it carries anything."""
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
        state.chunks += 1
        state.model = state.model or chunk.get("model")
        if isinstance(chunk.get("usage"), dict):
            state.usage = chunk["usage"]
        if not choices:
            return None  # the usage-only chunk at the end
        choice = choices[0]
        if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict | None):
            self.malformed("a stream choice or its delta is not a JSON object")
        try:
            return state.take(choice)
        except (TypeError, ValueError) as exc:
            self.malformed(f"a stream delta: {exc}")


def _for_llama_cpp(body: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python's server takes a JSON schema as ``json_object`` with ``schema`` (it
    refuses ``json_schema`` with a 500), an assistant message with tool calls only with text
    content (null is a 500), and the text of content parts only as a string (its ChatML
    drops parts) (tests/test_llama_wire.py)."""
    fitted = dict(body)
    output = body.get("response_format") or {}
    if output.get("type") == "json_schema":
        schema = (output.get("json_schema") or {}).get("schema") or {"type": "object"}
        fitted["response_format"] = {"type": "json_object", "schema": schema}
    fitted["messages"] = [_llama_message(m) for m in body.get("messages") or []]
    return fitted


def _llama_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return {**message, "content": ""}
    if isinstance(content, list) and all(p.get("type") == "text" for p in content):
        return {**message, "content": text_of(content)}
    return message
