"""One simulated backend instance: a raw ASGI app serving all three wire protocols.

The tier configuration decides which protocol a client speaks; the instance answers
whichever it is asked. Faults apply to every protocol endpoint (or only to chat, with
``scope: chat``); the admin API under ``/_sim/`` is never faulted, delayed or counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from simulator.admin import handle_admin
from simulator.answer import Answer, ChatCall, make_answer
from simulator.asgi import (
    Receive,
    Reply,
    Scope,
    Send,
    Watch,
    drop_connection,
    forever,
    header,
    json_reply,
    read_body,
    reset_connection,
    send_chunk,
    send_reply,
    start_stream,
)
from simulator.faults import FaultSettings, FaultState, Mode, Stats, faults_from_env
from simulator.slots import Slots
from simulator.wire import Streamer, Wire, WireError
from simulator.wire_anthropic import AnthropicWire
from simulator.wire_ollama import OllamaWire
from simulator.wire_openai import SSE, OpenAIWire


@dataclass(frozen=True)
class Route:
    endpoint: str  # "POST /v1/chat/completions": the key in /_sim/stats
    protocol: str  # "openai", "ollama", "anthropic", or "" when chosen by headers
    info: Callable[[Wire], Reply] | None = None  # liveness endpoints; None means chat
    # Waits for a generation slot: chat, and GET /v1/models (llama-cpp-python's does).
    uses_model: bool = True

    @property
    def is_chat(self) -> bool:
        return self.info is None


def _models(wire: Wire) -> Reply:
    assert isinstance(wire, OpenAIWire | AnthropicWire)
    return wire.models()


def _tags(wire: Wire) -> Reply:
    assert isinstance(wire, OllamaWire)
    return wire.tags()


def _version(wire: Wire) -> Reply:
    assert isinstance(wire, OllamaWire)
    return wire.version()


ROUTES = {
    ("POST", "/v1/chat/completions"): Route("POST /v1/chat/completions", "openai"),
    ("POST", "/v1/messages"): Route("POST /v1/messages", "anthropic"),
    ("POST", "/api/chat"): Route("POST /api/chat", "ollama"),
    # OpenAI and Anthropic share this path; Anthropic clients always send anthropic-version.
    ("GET", "/v1/models"): Route("GET /v1/models", "", _models),
    ("GET", "/api/tags"): Route("GET /api/tags", "ollama", _tags, uses_model=False),
    ("GET", "/api/version"): Route("GET /api/version", "ollama", _version, uses_model=False),
}
KNOWN_PATHS = {path for _, path in ROUTES}


class SimulatorApp:
    """The ASGI callable of one named instance, with its faults and its counters."""

    def __init__(self, name: str, faults: FaultSettings | None = None) -> None:
        self.name = name
        self.faults = FaultState(faults)
        self.stats = Stats()
        self.slots = Slots()
        self.wires: dict[str, Wire] = {
            wire.protocol: wire
            for wire in (OpenAIWire(name), OllamaWire(name), AnthropicWire(name))
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/_sim/"):
            await handle_admin(self, scope, receive, send)
            return
        route = ROUTES.get((scope["method"], path))
        if route is None:
            await read_body(receive)
            await send_reply(send, _unrouted(scope, path))
            return
        self.stats.received(route.endpoint)
        body = await read_body(receive)
        wire = self.wires[route.protocol or _protocol_by_headers(scope)]
        mode = self.faults.draw(route.is_chat)
        self.stats.logged(route.endpoint, body, mode)
        watch = Watch(receive)
        answer = self._answer(route, wire, mode, body, watch, send)
        self.stats.enter()
        try:
            if not self._takes_time(mode):
                await answer  # sent at once: nothing to stop, and no watch to pay for
            elif await watch.run(answer):
                self.stats.abort()
        finally:
            self.stats.leave()

    def _takes_time(self, mode: Mode) -> bool:
        settings = self.faults.settings
        waits = mode in (Mode.HANG, Mode.RESET) or settings.slots is not None
        return waits or bool(settings.latency_ms or settings.tokens_per_second)

    def _slot_limit(self) -> int | None:
        return self.faults.settings.slots

    async def _answer(
        self, route: Route, wire: Wire, mode: Mode, body: bytes, watch: Watch, send: Send
    ) -> None:
        settings = self.faults.settings
        if settings.latency_ms:
            await asyncio.sleep(settings.latency_ms / 1000)
        if mode is not Mode.OK:
            self.stats.faulted(mode)
            await self._fault(mode, wire, body, watch, send)
        elif route.info is None:
            await self._chat(wire, body, watch, send)
        elif route.uses_model:
            async with self.slots.hold(self._slot_limit):
                await send_reply(send, route.info(wire))
        else:
            await send_reply(send, route.info(wire))

    async def _fault(self, mode: Mode, wire: Wire, body: bytes, watch: Watch, send: Send) -> None:
        if mode is Mode.RESET:
            await reset_connection(send, watch)
        elif mode is Mode.HANG:
            await forever()
        elif mode is Mode.CONTEXT_LENGTH and self._empty_overflow(wire, wire.wants_stream(body)):
            await start_stream(send, SSE)
            await send_chunk(send, b"", more=False)
        else:
            await send_reply(send, self._fault_reply(mode, wire, body))

    def _fault_reply(self, mode: Mode, wire: Wire, body: bytes) -> Reply:
        settings = self.faults.settings
        if mode is Mode.ERROR_500:
            return wire.server_error()
        if mode is Mode.OVERLOADED:
            return wire.overloaded()
        if mode is Mode.RATE_LIMIT:
            return wire.rate_limited(settings.retry_after)
        if mode is Mode.MALFORMED:
            return wire.malformed(wire.wants_stream(body))
        if mode is Mode.WRONG_SHAPE:
            return wire.wrong_shape(wire.wants_stream(body))
        if mode is Mode.BAD_REQUEST:
            return wire.bad_request(settings.error_message)
        # Mode.CONTEXT_LENGTH: the error names the prompt's size, so the body is parsed.
        try:
            prompt_tokens = wire.parse_chat(body).prompt_tokens
        except WireError as exc:
            return exc.reply
        limit = settings.max_context_words or max(prompt_tokens - 1, 1)
        return wire.context_length(prompt_tokens, limit)

    def _empty_overflow(self, wire: Wire, stream: bool) -> bool:
        """A streamed context overflow is an empty 200 stream (llama-cpp-python's)."""
        return (
            stream and wire.protocol == "openai" and self.faults.settings.overflow_stream == "empty"
        )

    async def _chat(self, wire: Wire, body: bytes, watch: Watch, send: Send) -> None:
        try:
            call = wire.parse_chat(body)
        except WireError as exc:
            await send_reply(send, exc.reply)
            return
        settings = self.faults.settings
        limit = settings.max_context_words
        overflow = limit is not None and call.prompt_tokens > limit
        if limit is not None and overflow and not self._empty_overflow(wire, call.stream):
            await send_reply(send, wire.context_length(call.prompt_tokens, limit))
            return
        if not settings.stream_usage:
            call = replace(call, include_usage=False)
        answer = make_answer(self.name, call)
        streamer = wire.streamer(call, answer) if call.stream else None
        if streamer is not None:
            # A stream's 200 comes at once, even when it waits for a slot (as llama.cpp's).
            await start_stream(send, streamer.content_type)
        async with self.slots.hold(self._slot_limit) as arrivals:
            if streamer is None:
                await self._plain(wire, call, answer, send)
            elif overflow:
                await send_chunk(send, b"", more=False)
            else:
                await self._stream(
                    streamer, answer, Interrupt(self, streamer, arrivals), watch, send
                )

    async def _plain(self, wire: Wire, call: ChatCall, answer: Answer, send: Send) -> None:
        interval = self._interval()
        if interval:
            await asyncio.sleep(interval * answer.completion_tokens)
        await send_reply(send, wire.completion(call, answer))

    def _interval(self) -> float:
        pace = self.faults.settings.tokens_per_second
        return 1 / pace if pace else 0.0

    async def _stream(
        self, streamer: Streamer, answer: Answer, interrupt: Interrupt, watch: Watch, send: Send
    ) -> None:
        frames = [streamer.head(), *map(streamer.piece, answer.pieces)]
        interval = self._interval()
        if not interval:
            # Unpaced: one write for the whole stream keeps benchmarks cheap; clients parse
            # the frames the same way whatever the TCP segments.
            await send_chunk(send, b"".join([*frames, streamer.tail()]), more=False)
            return
        await send_chunk(send, frames[0])
        if await _paced(send, frames[1:], interval, interrupt) or interrupt():
            # As llama-cpp-python: [DONE] instead of the rest, then the connection drops.
            self.stats.interrupt()
            await send_chunk(send, interrupt.frame)
            await drop_connection(send, watch)
            return
        await send_chunk(send, streamer.tail(), more=False)


class Interrupt:
    """Whether a newcomer has ended a running stream (the interrupt_streams fault): one
    that waits for a slot (llama-cpp-python's rule, which also cuts a stream that waited
    short as soon as it starts if another waits behind it), or, with free slots, one that
    arrived since the stream began."""

    def __init__(self, app: SimulatorApp, streamer: Streamer, arrivals: int) -> None:
        self.app = app
        self.frame = streamer.interruption() or b""
        self.arrivals = arrivals  # requests for the model when this stream began

    def __call__(self) -> bool:
        if not (self.frame and self.app.faults.settings.interrupt_streams):
            return False
        slots = self.app.slots
        return slots.waiting > 0 or slots.arrivals != self.arrivals


async def _paced(
    send: Send, frames: list[bytes], interval: float, stop: Callable[[], bool]
) -> bool:
    """Send one frame per interval against a fixed schedule, so sleeps do not add drift;
    True if ``stop()`` said to stop before a frame."""
    start = time.monotonic()
    for i, frame in enumerate(frames, start=1):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop():
            return True
        if frame:  # a piece may have no frame of its own (Ollama sends a tool call whole)
            await send_chunk(send, frame)
    return False


def _protocol_by_headers(scope: Scope) -> str:
    return "anthropic" if header(scope, b"anthropic-version") is not None else "openai"


def _unrouted(scope: Scope, path: str) -> Reply:
    if path in KNOWN_PATHS:
        return json_reply(405, {"error": f"method {scope['method']} not allowed on {path}"})
    return json_reply(404, {"error": f"no such endpoint: {path}"})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(name: str, faults: FaultSettings | None = None) -> SimulatorApp:
    """An instance named ``name``; without ``faults``, the initial ones come from the env."""
    return SimulatorApp(name, faults if faults is not None else faults_from_env(name))
