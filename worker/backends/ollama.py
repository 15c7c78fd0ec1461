"""Ollama's native /api/chat: NDJSON streaming, options instead of top-level parameters.

The request's translation and the tool calls' are in ollama_messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tierq.errors import ErrorClass
from worker.backends.base import BackendClient, ChatAnswer, Delta, count_of, max_tokens_of
from worker.backends.errors import ErrorInfo, class_for_stream_error
from worker.backends.ollama_messages import (
    format_of,
    ollama_messages,
    ollama_tools,
    openai_tool_calls,
)
from worker.backends.translate import Untranslatable

PATH = "/api/chat"
# OpenAI sampling parameters that Ollama takes, under the same names, in "options".
SAME_NAME_OPTIONS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")


class OllamaClient(BackendClient):
    liveness_path = "/api/version"

    def headers(self) -> dict[str, str]:
        # Ollama has no keys of its own, but it is often put behind a proxy that wants one.
        if self._secret is None:
            return {}
        return {"authorization": f"Bearer {self._secret}"}

    def body(
        self, request: dict[str, Any], stream: bool, model: str | None = None
    ) -> dict[str, Any]:
        try:
            messages = ollama_messages(request.get("messages", []))
        except Untranslatable as exc:
            # Refused before sending: the request itself is what this protocol cannot carry.
            self.fail(ErrorClass.CLIENT, f"cannot send over the Ollama protocol: {exc}")
        body: dict[str, Any] = {
            "model": model or self.config.model,
            "messages": messages,
            "stream": stream,
        }
        if tools := ollama_tools(request):
            body["tools"] = tools
        options = {k: request[k] for k in SAME_NAME_OPTIONS if request.get(k) is not None}
        if (limit := max_tokens_of(request)) is not None:
            options["num_predict"] = limit
        if (stop := request.get("stop")) is not None:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        if options:
            body["options"] = options
        if (output_format := format_of(request.get("response_format"))) is not None:
            body["format"] = output_format
        return body

    async def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        data = await self.post_json(
            PATH, self.body(request, stream=False, model=model), self.timeout_within(timeout)
        )
        content, calls = self._message_of(data)
        if data.get("done") is not True:
            self.malformed("the answer is not done")
        return self._answer(data, content, calls)

    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[Delta], None],
    ) -> ChatAnswer:
        limits = self.timeout_within(timeout)
        parts: list[str] = []
        calls: list[dict[str, Any]] = []
        body = self.body(request, stream=True, model=model)
        with self.translate_errors(limits):
            async with self.open_stream(PATH, body, limits) as response:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    data = self._load_line(line)
                    content, new_calls = self._message_of(data)
                    if content:
                        parts.append(content)
                        on_delta({"content": content})
                    if new_calls:
                        on_delta({"tool_calls": _first_pieces(new_calls, len(calls))})
                        calls += new_calls
                    if data.get("done") is True:
                        return self._answer(data, "".join(parts), calls)
        self.malformed("the stream ended without a done line")

    def _load_line(self, line: str) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except ValueError:
            self.malformed("a stream line is not valid JSON")
        if not isinstance(data, dict):
            self.malformed("a stream line is not a JSON object")
        return data

    def _message_of(self, data: Any) -> tuple[str, list[dict[str, Any]]]:
        """The message text and tool calls (OpenAI's shape) of one answer object; an
        ``error`` object is raised."""
        if not isinstance(data, dict):
            self.malformed("not a JSON object")
        if isinstance(data.get("error"), str):
            # Ollama reports failures after the 200 as a line of their own.
            info = ErrorInfo(data["error"])
            self.fail(class_for_stream_error(info), f"in stream: {info.message}", 200)
        message = data.get("message")
        if not isinstance(message, dict):
            self.malformed("no message")
        try:
            calls = openai_tool_calls(message.get("tool_calls"))
        except ValueError as exc:
            self.malformed(str(exc))
        content = message.get("content")
        if content is None and calls:
            content = ""  # a tool call alone may come without text
        if not isinstance(content, str):
            self.malformed("no message.content")
        return content, calls

    def _answer(
        self, final: dict[str, Any], content: str, calls: list[dict[str, Any]]
    ) -> ChatAnswer:
        reason = final.get("done_reason")
        finish = reason if isinstance(reason, str) and reason else "stop"
        if calls and finish == "stop":
            finish = "tool_calls"  # Ollama ends a tool call as it ends any answer
        return ChatAnswer(
            content=content if content or not calls else None,
            finish_reason=finish,
            prompt_tokens=count_of(final.get("prompt_eval_count")),
            completion_tokens=count_of(final.get("eval_count")),
            model=str(final.get("model") or self.config.model),
            tool_calls=calls or None,
        )


def _first_pieces(calls: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """Whole tool calls as OpenAI's first streamed pieces, arguments included: Ollama sends
    a call only once the model has written all of it."""
    return [{"index": start + i, **call} for i, call in enumerate(calls)]
