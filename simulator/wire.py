"""What every wire protocol of the simulator provides: parsing, answers, streams, errors."""

from __future__ import annotations

import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from simulator.answer import Answer, ChatCall, text_of
from simulator.asgi import Reply
from simulator.tools import Extras, RequestError


class WireError(Exception):
    """A request the protocol rejects; ``reply`` is the protocol's own error response."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class Streamer(ABC):
    """The frames of one streamed answer: a head, one frame per piece, a tail."""

    content_type: ClassVar[str]

    @abstractmethod
    def head(self) -> bytes: ...

    @abstractmethod
    def piece(self, text: str) -> bytes: ...

    @abstractmethod
    def tail(self) -> bytes: ...

    def interruption(self) -> bytes | None:
        """The last frame of a stream a newcomer ends (interrupt_streams); None: this
        protocol's streams are not interrupted."""
        return None


class Wire(ABC):
    """One protocol as a simulated instance named ``instance`` speaks it."""

    protocol: ClassVar[str]
    stream_by_default: ClassVar[bool] = False
    model_required: ClassVar[str] = "model: Field required"

    def __init__(self, instance: str) -> None:
        self.instance = instance

    # -- requests ---------------------------------------------------------------------
    @abstractmethod
    def parse_chat(self, body: bytes) -> ChatCall: ...

    def wants_stream(self, body: bytes) -> bool:
        """Whether a request asks for a stream, for faults that answer before parsing."""
        try:
            data = json.loads(body)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        return bool(data.get("stream", self.stream_by_default))

    # -- answers ----------------------------------------------------------------------
    @abstractmethod
    def completion(self, call: ChatCall, answer: Answer) -> Reply: ...

    @abstractmethod
    def streamer(self, call: ChatCall, answer: Answer) -> Streamer: ...

    # -- errors -----------------------------------------------------------------------
    @abstractmethod
    def bad_request(self, message: str) -> Reply: ...

    @abstractmethod
    def not_found(self, message: str) -> Reply: ...

    @abstractmethod
    def server_error(self) -> Reply: ...

    @abstractmethod
    def overloaded(self) -> Reply: ...

    @abstractmethod
    def rate_limited(self, retry_after: float) -> Reply: ...

    @abstractmethod
    def context_length(self, prompt_tokens: int, limit: int) -> Reply: ...

    @abstractmethod
    def malformed(self, stream: bool) -> Reply: ...

    @abstractmethod
    def wrong_shape(self, stream: bool) -> Reply: ...

    # -- helpers for subclasses -------------------------------------------------------
    def load_object(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise WireError(self.bad_request(f"The request body is not valid JSON: {exc}")) from exc
        if not isinstance(data, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        return data

    def require_model(self, data: dict[str, Any]) -> str:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise WireError(self.bad_request(self.model_required))
        return model

    def read_messages(self, data: dict[str, Any]) -> list[tuple[str, str]]:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise WireError(self.bad_request("messages: Field required (a non-empty list)"))
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise WireError(self.bad_request(f"messages.{i}: expected an object with a role"))
            out.append((message["role"], text_of(message.get("content"))))
        return out

    def read_extras(self, read: Callable[[dict[str, Any]], Extras], data: dict[str, Any]) -> Extras:
        """Tools, tool results and JSON schema, read by ``read`` (after ``read_messages``)."""
        try:
            return read(data)
        except RequestError as exc:
            raise WireError(self.bad_request(str(exc))) from exc


def positive_int(value: Any) -> int | None:
    """A token limit as sent by a client; anything else means no limit."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def rate_limit_headers(retry_after: float) -> tuple[tuple[str, str], ...]:
    # Retry-After only carries whole seconds, so the exact value travels in retry-after-ms
    # (the header OpenAI and Anthropic send and their SDKs read first).
    return (
        ("retry-after", str(math.ceil(retry_after))),
        ("retry-after-ms", str(round(retry_after * 1000))),
    )


def unix_now() -> int:
    return int(time.time())


def call_id(prefix: str) -> str:
    """A tool call's id as the protocol spells it: ``call_…`` (OpenAI), ``toolu_…``."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"
