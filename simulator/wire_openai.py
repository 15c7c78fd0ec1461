"""OpenAI chat completions, as vLLM, llama.cpp, TGI and OpenAI itself speak it."""

from __future__ import annotations

import uuid
from typing import Any

from simulator.answer import Answer, ChatCall
from simulator.asgi import Reply, dumps, json_reply
from simulator.tools import openai_extras
from simulator.wire import Streamer, Wire, call_id, positive_int, rate_limit_headers, unix_now

SSE = "text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"


def _error(status: int, message: str, kind: str, code: str | None = None, **extra: Any) -> Reply:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code} | extra}
    return json_reply(status, body)


class OpenAIStreamer(Streamer):
    content_type = SSE

    def __init__(self, call: ChatCall, answer: Answer) -> None:
        self.call = call
        self.answer = answer
        self.call_id = call_id("call_")
        self.base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": unix_now(),
            "model": call.model,
            "system_fingerprint": "fp_tierq_sim",
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = self.base | {"choices": [choice]}
        if self.call.include_usage:
            # With include_usage every chunk carries "usage": null until the last one.
            chunk["usage"] = None
        return b"data: " + dumps(chunk) + b"\n\n"

    def head(self) -> bytes:
        tool_call = self.answer.tool_call
        if tool_call is None:
            return self._chunk({"role": "assistant", "content": "", "refusal": None})
        # As OpenAI streams a tool call: its id and name first, with empty arguments...
        function = {"name": tool_call.name, "arguments": ""}
        call = {"index": 0, "id": self.call_id, "type": "function", "function": function}
        delta = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        return self._chunk(delta)

    def piece(self, text: str) -> bytes:
        if self.answer.tool_call is None:
            return self._chunk({"content": text})
        # ... then the arguments' JSON text in fragments, under the same index.
        return self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})

    def tail(self) -> bytes:
        frames = [self._chunk({}, self.answer.finish)]
        if self.call.include_usage:
            usage = _usage(self.answer)
            frames.append(b"data: " + dumps(self.base | {"choices": [], "usage": usage}) + b"\n\n")
        frames.append(DONE)
        return b"".join(frames)

    def interruption(self) -> bytes:
        # llama-cpp-python ends an interrupted stream with [DONE] alone: no finish_reason.
        return DONE


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


class OpenAIWire(Wire):
    protocol = "openai"
    model_required = "you must provide a model parameter"

    def parse_chat(self, body: bytes) -> ChatCall:
        data = self.load_object(body)
        model = self.require_model(data)
        messages = self.read_messages(data)
        extras = self.read_extras(openai_extras, data)
        limit = data.get("max_completion_tokens", data.get("max_tokens"))
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ChatCall(
            model=model,
            messages=tuple(messages),
            max_tokens=positive_int(limit),
            stream=bool(data.get("stream", False)),
            include_usage=include_usage,
            tool=extras.tool,
            tool_result=extras.tool_result,
            json_schema=extras.json_schema,
        )

    def completion(self, call: ChatCall, answer: Answer) -> Reply:
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_call is not None:
            function = {"name": answer.tool_call.name, "arguments": answer.content}
            tool_call = {"id": call_id("call_"), "type": "function", "function": function}
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
        message["refusal"] = None
        return json_reply(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": unix_now(),
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": answer.finish,
                    }
                ],
                "usage": _usage(answer),
                "system_fingerprint": "fp_tierq_sim",
            },
        )

    def streamer(self, call: ChatCall, answer: Answer) -> Streamer:
        return OpenAIStreamer(call, answer)

    def models(self) -> Reply:
        model = {"id": self.instance, "object": "model", "created": 0, "owned_by": "tierq-sim"}
        return json_reply(200, {"object": "list", "data": [model]})

    def bad_request(self, message: str) -> Reply:
        return _error(400, message, "invalid_request_error")

    def not_found(self, message: str) -> Reply:
        return _error(404, message, "invalid_request_error", "unknown_url")

    def server_error(self) -> Reply:
        message = "The server had an error while processing your request. Sorry about that!"
        return _error(500, message, "server_error")

    def overloaded(self) -> Reply:
        message = "The engine is currently overloaded, please try again later."
        return _error(503, message, "server_error", "engine_overloaded")

    def rate_limited(self, retry_after: float) -> Reply:
        message = (
            f"Rate limit reached for requests on {self.instance}. "
            f"Please try again in {retry_after:g}s."
        )
        reply = _error(429, message, "requests", "rate_limit_exceeded")
        return Reply(reply.status, reply.body, reply.content_type, rate_limit_headers(retry_after))

    def context_length(self, prompt_tokens: int, limit: int) -> Reply:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
        return _error(400, message, "invalid_request_error", "context_length_exceeded")

    def malformed(self, stream: bool) -> Reply:
        # A body cut off mid-object: what a crashing proxy or a half-written buffer yields.
        body = b'{"id":"chatcmpl-sim","object":"chat.completion","choices":[{"index":0,"mess'
        if stream:
            return Reply(200, b"data: " + body + b"\n\ndata: [DONE]\n\n", SSE)
        return Reply(200, body)

    def wrong_shape(self, stream: bool) -> Reply:
        # Valid JSON from something that is not a chat-completions server.
        body = dumps({"status": "ok", "result": f"[{self.instance}] not a chat completion"})
        if stream:
            return Reply(200, b"data: " + body + b"\n\ndata: [DONE]\n\n", SSE)
        return Reply(200, body)
