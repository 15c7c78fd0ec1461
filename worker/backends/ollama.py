"""Ollama's native /api/chat: NDJSON streaming, options instead of top-level parameters."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from worker.backends.base import BackendClient, ChatAnswer, Delta, count_of, max_tokens_of, text_of
from worker.backends.errors import ErrorInfo, class_for_stream_error

PATH = "/api/chat"
# OpenAI sampling parameters that Ollama takes, under the same names, in "options".
SAME_NAME_OPTIONS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")
ROLES = {"developer": "system"}  # Ollama knows system, user, assistant, tool


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
        messages = [
            {
                "role": ROLES.get(str(m.get("role")), m.get("role")),
                "content": text_of(m.get("content")),
            }
            for m in request.get("messages", [])
            if isinstance(m, dict)
        ]
        body: dict[str, Any] = {
            "model": model or self.config.model,
            "messages": messages,
            "stream": stream,
        }
        options = {k: request[k] for k in SAME_NAME_OPTIONS if request.get(k) is not None}
        if (limit := max_tokens_of(request)) is not None:
            options["num_predict"] = limit
        if (stop := request.get("stop")) is not None:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        if options:
            body["options"] = options
        if (output_format := _format_of(request.get("response_format"))) is not None:
            body["format"] = output_format
        return body

    async def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        data = await self.post_json(
            PATH, self.body(request, stream=False, model=model), self.timeout_within(timeout)
        )
        content = self._content_of(data)
        if data.get("done") is not True:
            self.malformed("the answer is not done")
        return self._answer(data, content)

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
        body = self.body(request, stream=True, model=model)
        with self.translate_errors(limits):
            async with self.open_stream(PATH, body, limits) as response:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    data = self._load_line(line)
                    content = self._content_of(data)
                    if content:
                        parts.append(content)
                        on_delta({"content": content})
                    if data.get("done") is True:
                        return self._answer(data, "".join(parts))
        self.malformed("the stream ended without a done line")

    def _load_line(self, line: str) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except ValueError:
            self.malformed("a stream line is not valid JSON")
        if not isinstance(data, dict):
            self.malformed("a stream line is not a JSON object")
        return data

    def _content_of(self, data: Any) -> str:
        """The message text of one answer object; an ``error`` object is raised."""
        if not isinstance(data, dict):
            self.malformed("not a JSON object")
        if isinstance(data.get("error"), str):
            # Ollama reports failures after the 200 as a line of their own.
            info = ErrorInfo(data["error"])
            self.fail(class_for_stream_error(info), f"in stream: {info.message}", 200)
        message = data.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            self.malformed("no message.content")
        return message["content"]

    def _answer(self, final: dict[str, Any], content: str) -> ChatAnswer:
        reason = final.get("done_reason")
        return ChatAnswer(
            content=content,
            finish_reason=reason if isinstance(reason, str) and reason else "stop",
            prompt_tokens=count_of(final.get("prompt_eval_count")),
            completion_tokens=count_of(final.get("eval_count")),
            model=str(final.get("model") or self.config.model),
        )


def _format_of(response_format: Any) -> Any:
    """OpenAI's response_format as Ollama's ``format``: "json" or a JSON schema."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "json"
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if response_format.get("type") == "json_schema" and schema else None
