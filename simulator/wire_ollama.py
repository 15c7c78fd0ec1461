"""Ollama's native API: /api/chat streams NDJSON unless ``"stream": false``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from simulator.answer import Answer, ChatCall
from simulator.asgi import Reply, dumps, json_reply
from simulator.tools import ollama_extras
from simulator.wire import Streamer, Wire, positive_int, rate_limit_headers

NDJSON = "application/x-ndjson"
VERSION = "0.12.6"
# Fixed stand-ins for work a real server does before generating.
LOAD_NS = 1_500_000
PROMPT_EVAL_NS_PER_TOKEN = 200_000


def _created_at() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


def _message(content: str, answer: Answer | None = None) -> dict[str, Any]:
    """An assistant message; with ``answer``'s tool call, if it has one."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if answer is not None and answer.tool_call is not None:
        # Ollama's arguments are an object, not JSON text as OpenAI's; no id, no index.
        function = {"name": answer.tool_call.name, "arguments": answer.tool_call.arguments}
        message["tool_calls"] = [{"function": function}]
    return message


def _line(call: ChatCall, message: dict[str, Any]) -> bytes:
    data = {"model": call.model, "created_at": _created_at(), "message": message, "done": False}
    return dumps(data) + b"\n"


def _final(call: ChatCall, answer: Answer, message: dict[str, Any]) -> dict[str, Any]:
    """The closing object (streamed) or the whole answer (not streamed), with timings."""
    generating = time.monotonic_ns() - call.received_ns
    prompt_eval = answer.prompt_tokens * PROMPT_EVAL_NS_PER_TOKEN
    return {
        "model": call.model,
        "created_at": _created_at(),
        "message": message,
        # A tool call ends as any answer does: Ollama has no finish reason of its own for it.
        "done_reason": "length" if answer.finish == "length" else "stop",
        "done": True,
        "total_duration": LOAD_NS + prompt_eval + generating,
        "load_duration": LOAD_NS,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": prompt_eval,
        "eval_count": answer.completion_tokens,
        "eval_duration": generating,
    }


class OllamaStreamer(Streamer):
    content_type = NDJSON

    def __init__(self, call: ChatCall, answer: Answer) -> None:
        self.call = call
        self.answer = answer

    def head(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
        if self.answer.tool_call is not None:
            return b""  # Ollama sends a tool call whole, once the model has written it
        return _line(self.call, _message(text))

    def tail(self) -> bytes:
        final = dumps(_final(self.call, self.answer, _message(""))) + b"\n"
        if self.answer.tool_call is None:
            return final
        return _line(self.call, _message("", self.answer)) + final


class OllamaWire(Wire):
    protocol = "ollama"
    stream_by_default = True
    model_required = "model is required"

    def parse_chat(self, body: bytes) -> ChatCall:
        data = self.load_object(body)
        model = self.require_model(data)
        options = data.get("options")
        if not isinstance(options, dict):
            options = {}
        messages = tuple(self.read_messages(data))
        extras = self.read_extras(ollama_extras, data)
        return ChatCall(
            model=model,
            messages=messages,
            # num_predict -1 (infinite) and -2 (fill the context) both mean no cut.
            max_tokens=positive_int(options.get("num_predict")),
            stream=bool(data.get("stream", True)),
            tool=extras.tool,
            tool_result=extras.tool_result,
            json_schema=extras.json_schema,
        )

    def completion(self, call: ChatCall, answer: Answer) -> Reply:
        content = "" if answer.tool_call is not None else answer.content
        return json_reply(200, _final(call, answer, _message(content, answer)))

    def streamer(self, call: ChatCall, answer: Answer) -> Streamer:
        return OllamaStreamer(call, answer)

    def tags(self) -> Reply:
        model = {
            "name": f"{self.instance}:latest",
            "model": f"{self.instance}:latest",
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 0,
            "digest": "0" * 64,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "tierq-sim",
                "families": ["tierq-sim"],
                "parameter_size": "0B",
                "quantization_level": "none",
            },
        }
        return json_reply(200, {"models": [model]})

    def version(self) -> Reply:
        return json_reply(200, {"version": VERSION})

    def bad_request(self, message: str) -> Reply:
        return _error(400, message)

    def not_found(self, message: str) -> Reply:
        return _error(404, message)

    def server_error(self) -> Reply:
        return _error(500, "llama runner process has terminated: exit status 2")

    def overloaded(self) -> Reply:
        return _error(503, "server busy, please try again.  maximum pending requests exceeded")

    def rate_limited(self, retry_after: float) -> Reply:
        reply = _error(429, "too many requests, please retry later")
        return Reply(reply.status, reply.body, reply.content_type, rate_limit_headers(retry_after))

    def context_length(self, prompt_tokens: int, limit: int) -> Reply:
        return _error(400, "the input length exceeds the context length")

    def malformed(self, stream: bool) -> Reply:
        line = b'{"model":"sim","created_at":"2025-01-01T00:00:00Z","message":{"role":"assi'
        if stream:
            return Reply(200, line + b"\n", NDJSON)
        return Reply(200, line)

    def wrong_shape(self, stream: bool) -> Reply:
        # /api/generate's shape where /api/chat's is expected: an easy mistake to make.
        line = dumps({"model": "sim", "response": f"[{self.instance}]", "done": True})
        if stream:
            return Reply(200, line + b"\n", NDJSON)
        return Reply(200, line)
