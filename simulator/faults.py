"""Fault settings of one simulated backend, and the counters that prove what it received.

Everything here is touched only from the event loop that serves the instance, so plain
attributes are enough: there is no lock to take on the hot path.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from simulator.tools import count_images

ENV_FAULTS = "TIERQ_SIM_FAULTS"


class Mode(StrEnum):
    OK = "ok"
    ERROR_500 = "error_500"
    OVERLOADED = "overloaded"  # 503 (OpenAI, Ollama) or 529 overloaded_error (Anthropic)
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After and retry-after-ms
    RESET = "reset"  # TCP reset, no HTTP response at all
    HANG = "hang"  # accept and never answer
    MALFORMED = "malformed"  # 200 whose body is not valid JSON
    WRONG_SHAPE = "wrong_shape"  # 200 with valid JSON that is not the protocol's shape
    CONTEXT_LENGTH = "context_length"  # 400 with the protocol's own context-length error
    BAD_REQUEST = "bad_request"  # 400 with the protocol's own invalid-request error


# Modes that only make sense for a chat request: a liveness endpoint has no prompt to reject.
CHAT_ONLY_MODES = frozenset({Mode.CONTEXT_LENGTH, Mode.BAD_REQUEST})
DEFAULT_BAD_REQUEST = "Unsupported parameter: 'logit_bias' is not supported with this model."
# Requests kept for GET /_sim/requests; older ones are dropped, so a long benchmark stays small.
REQUEST_LOG_SIZE = 2000


class FaultSettings(BaseModel):
    """What the instance does to the requests it receives; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Mode.OK
    count: int | None = Field(
        default=None, ge=1, description="Apply `mode` to the next N requests, then go back to ok."
    )
    latency_ms: float = Field(
        default=0.0, ge=0, description="Delay before the first byte of any answer."
    )
    tokens_per_second: float | None = Field(
        default=None, gt=0, description="Pace of generated tokens; empty means as fast as possible."
    )
    retry_after: float = Field(default=1.0, ge=0, description="Seconds announced by rate_limit.")
    max_context_words: int | None = Field(
        default=None,
        ge=1,
        description="Longer prompts get the context-length error even in ok mode.",
    )
    error_message: str = Field(
        default=DEFAULT_BAD_REQUEST,
        min_length=1,
        description="The reason bad_request gives, in the protocol's error shape.",
    )
    scope: Literal["all", "chat"] = Field(
        default="all",
        description="'chat': liveness endpoints keep answering while inference fails.",
    )
    # llama-cpp-python's server, as tests/test_llama_wire.py pins it down:
    slots: int | None = Field(
        default=None,
        ge=1,
        description="Generations at once (chat, and GET /v1/models, which waits for the "
        "model too); the others wait. Empty: no limit.",
    )
    interrupt_streams: bool = Field(
        default=False,
        description="A request for the model ends a running OpenAI stream: its last event "
        "is [DONE], with no finish_reason, and the connection drops mid-body.",
    )
    overflow_stream: Literal["error", "empty"] = Field(
        default="error",
        description="A streamed OpenAI request over the context: the protocol's error, or "
        "'empty', an empty 200 event stream.",
    )
    stream_usage: bool = Field(
        default=True,
        description="false: OpenAI streams never carry usage, even with include_usage.",
    )


class FaultState:
    """The live settings of one instance and how many faulted requests are left."""

    def __init__(self, initial: FaultSettings | None = None) -> None:
        self.initial = initial or FaultSettings()
        self.settings = self.initial
        self.remaining = self.initial.count

    def replace(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.remaining = settings.count

    def patch(self, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into the current settings (validated like a full replace)."""
        merged = self.settings.model_dump() | changes
        self.replace(FaultSettings.model_validate(merged))

    def reset(self) -> None:
        self.replace(self.initial)

    def draw(self, is_chat: bool) -> Mode:
        """The mode that applies to one request; a counted fault is used up by it."""
        mode = self.settings.mode
        if mode is Mode.OK or not self._applies(mode, is_chat):
            return Mode.OK
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                # The fault is spent: keep latency, pacing and context limit, drop the mode.
                self.settings = self.settings.model_copy(update={"mode": Mode.OK, "count": None})
                self.remaining = None
        return mode

    def _applies(self, mode: Mode, is_chat: bool) -> bool:
        if is_chat:
            return True
        return self.settings.scope == "all" and mode not in CHAT_ONLY_MODES

    def snapshot(self) -> dict[str, Any]:
        data = self.settings.model_dump(mode="json")
        data["count"] = self.remaining
        return data


@dataclass(frozen=True)
class Received:
    """One request as it arrived: what a test reads to see what a client really sent."""

    seq: int
    endpoint: str
    at: float  # wall-clock seconds (time.time()), comparable across processes on one host
    body: bytes
    fault: Mode

    def snapshot(self) -> dict[str, Any]:
        try:
            body: Any = json.loads(self.body) if self.body else None
        except ValueError:
            body = self.body.decode("utf-8", "replace")
        return {
            "seq": self.seq,
            "endpoint": self.endpoint,
            "at": self.at,
            "fault": self.fault.value,
            "body": body,
            "images": count_images(body),  # image parts, whichever protocol sent them
        }


class Stats:
    """Requests received per endpoint (admin calls excluded), faults served, concurrency,
    requests the client gave up on, and a log of the latest requests with their bodies."""

    def __init__(self) -> None:
        self.endpoints: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.aborted = 0  # closed by the client before the whole answer was sent
        self.interrupted = 0  # streams ended by a newcomer (interrupt_streams)
        self.log: deque[Received] = deque(maxlen=REQUEST_LOG_SIZE)
        self._seq = 0

    def received(self, endpoint: str) -> None:
        self.endpoints[endpoint] += 1

    def logged(self, endpoint: str, body: bytes, fault: Mode) -> None:
        self._seq += 1
        self.log.append(Received(self._seq, endpoint, time.time(), body, fault))

    def faulted(self, mode: Mode) -> None:
        self.faults[mode.value] += 1

    def enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def abort(self) -> None:
        self.aborted += 1

    def interrupt(self) -> None:
        self.interrupted += 1

    def reset(self) -> None:
        """Counters and log back to zero; requests still open keep counting as in flight."""
        self.endpoints.clear()
        self.faults.clear()
        self.log.clear()
        self.aborted = 0
        self.interrupted = 0
        self.max_in_flight = self.in_flight

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": sum(self.endpoints.values()),
            "endpoints": dict(self.endpoints),
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "aborted": self.aborted,
            "interrupted": self.interrupted,
        }

    def requests(self) -> list[dict[str, Any]]:
        return [entry.snapshot() for entry in self.log]


def env_key(name: str) -> str:
    """``TIERQ_SIM_FAULTS__GPU_VLLM`` for the instance named ``gpu-vllm``."""
    return f"{ENV_FAULTS}__{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}"


def faults_from_env(name: str, environ: dict[str, str] | None = None) -> FaultSettings:
    """Initial faults: ``TIERQ_SIM_FAULTS`` (JSON, every instance), then the per-name key."""
    environ = dict(os.environ) if environ is None else environ
    merged: dict[str, Any] = {}
    for key in (ENV_FAULTS, env_key(name)):
        text = environ.get(key, "").strip()
        if not text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{key}: not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a JSON object of fault settings")
        merged |= value
    return FaultSettings.model_validate(merged)
