"""Anthropic's Messages API, with its SSE event sequence and its error envelope."""

from __future__ import annotations

import uuid
from typing import Any

from simulator.answer import Answer, ChatCall, text_of
from simulator.asgi import Reply, dumps, json_reply
from simulator.tools import anthropic_extras
from simulator.wire import Streamer, Wire, WireError, call_id, positive_int, rate_limit_headers

SSE = "text/event-stream; charset=utf-8"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _stop_reason(answer: Answer) -> str:
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(answer.finish, "end_turn")


def _delta(delta: dict[str, Any]) -> bytes:
    data = {"type": "content_block_delta", "index": 0, "delta": delta}
    return _event("content_block_delta", data)


def _error(status: int, kind: str, message: str) -> Reply:
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return json_reply(status, body, (("request-id", request_id),))


class AnthropicStreamer(Streamer):
    content_type = SSE

    def __init__(self, call: ChatCall, answer: Answer) -> None:
        self.call = call
        self.answer = answer

    def _block(self) -> dict[str, Any]:
        tool_call = self.answer.tool_call
        if tool_call is None:
            return {"type": "text", "text": ""}
        # The input arrives as input_json_delta fragments; the block starts with it empty.
        return {"type": "tool_use", "id": call_id("toolu_"), "name": tool_call.name, "input": {}}

    def head(self) -> bytes:
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self.call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The real API reports one output token at the start; the final count follows.
            "usage": {"input_tokens": self.answer.prompt_tokens, "output_tokens": 1},
        }
        return b"".join(
            [
                _event("message_start", {"type": "message_start", "message": message}),
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": self._block()},
                ),
                _event("ping", {"type": "ping"}),
                # The API's first input_json_delta of a tool_use block is empty.
                _delta({"type": "input_json_delta", "partial_json": ""})
                if self.answer.tool_call is not None
                else b"",
            ]
        )

    def piece(self, text: str) -> bytes:
        if self.answer.tool_call is not None:
            return _delta({"type": "input_json_delta", "partial_json": text})
        return _delta({"type": "text_delta", "text": text})

    def tail(self) -> bytes:
        usage = {
            "input_tokens": self.answer.prompt_tokens,
            "output_tokens": self.answer.completion_tokens,
        }
        delta = {"stop_reason": _stop_reason(self.answer), "stop_sequence": None}
        return b"".join(
            [
                _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
                _event("message_stop", {"type": "message_stop"}),
            ]
        )


class AnthropicWire(Wire):
    protocol = "anthropic"

    def parse_chat(self, body: bytes) -> ChatCall:
        data = self.load_object(body)
        model = self.require_model(data)
        max_tokens = positive_int(data.get("max_tokens"))
        if max_tokens is None or max_tokens < 1:
            raise WireError(self.bad_request("max_tokens: Field required"))
        messages = self.read_messages(data)
        for i, (role, _) in enumerate(messages):
            if role not in ("user", "assistant"):
                message = (
                    f'messages.{i}.role: Input should be "user" or "assistant"; '
                    "use the top-level `system` parameter for a system prompt"
                )
                raise WireError(self.bad_request(message))
        extras = self.read_extras(anthropic_extras, data)
        system = text_of(data.get("system"))
        if system:
            messages.insert(0, ("system", system))
        return ChatCall(
            model=model,
            messages=tuple(messages),
            max_tokens=max_tokens,
            stream=bool(data.get("stream", False)),
            tool=extras.tool,
            tool_result=extras.tool_result,
        )

    def completion(self, call: ChatCall, answer: Answer) -> Reply:
        block: dict[str, Any] = {"type": "text", "text": answer.content}
        if answer.tool_call is not None:
            block = {
                "type": "tool_use",
                "id": call_id("toolu_"),
                "name": answer.tool_call.name,
                "input": answer.tool_call.arguments,
            }
        return json_reply(
            200,
            {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": call.model,
                "content": [block],
                "stop_reason": _stop_reason(answer),
                "stop_sequence": None,
                "usage": {
                    "input_tokens": answer.prompt_tokens,
                    "output_tokens": answer.completion_tokens,
                },
            },
        )

    def streamer(self, call: ChatCall, answer: Answer) -> Streamer:
        return AnthropicStreamer(call, answer)

    def models(self) -> Reply:
        model = {
            "type": "model",
            "id": self.instance,
            "display_name": f"Simulated {self.instance}",
            "created_at": "2025-01-01T00:00:00Z",
        }
        page = {"data": [model], "has_more": False, "first_id": self.instance}
        return json_reply(200, page | {"last_id": self.instance})

    def bad_request(self, message: str) -> Reply:
        return _error(400, "invalid_request_error", message)

    def not_found(self, message: str) -> Reply:
        return _error(404, "not_found_error", message)

    def server_error(self) -> Reply:
        return _error(500, "api_error", "Internal server error")

    def overloaded(self) -> Reply:
        return _error(529, "overloaded_error", "Overloaded")

    def rate_limited(self, retry_after: float) -> Reply:
        message = "This request would exceed the rate limit for your organization."
        reply = _error(429, "rate_limit_error", message)
        headers = reply.headers + rate_limit_headers(retry_after)
        return Reply(reply.status, reply.body, reply.content_type, headers)

    def context_length(self, prompt_tokens: int, limit: int) -> Reply:
        message = f"prompt is too long: {prompt_tokens} tokens > {limit} maximum"
        return _error(400, "invalid_request_error", message)

    def malformed(self, stream: bool) -> Reply:
        if stream:
            cut = b'event: message_start\ndata: {"type":"message_start","message":{"id":"ms\n\n'
            return Reply(200, cut, SSE)
        return Reply(200, b'{"id":"msg_sim","type":"message","content":[{"type":"te')

    def wrong_shape(self, stream: bool) -> Reply:
        # The legacy Text Completions shape, valid JSON but not a Messages answer.
        data = {"type": "completion", "completion": f"[{self.instance}]", "stop_reason": None}
        if stream:
            return Reply(200, _event("completion", data), SSE)
        return json_reply(200, data)
