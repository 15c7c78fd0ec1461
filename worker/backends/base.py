"""What every backend client shares: the answer, HTTP, and turning failures into errors.

Clients are asynchronous: a worker keeps many calls in flight on one event loop, and a
call is stopped (a client's cancel, an operator retiring a backend) by cancelling the task
that awaits it, which closes its connection, so the server sees its client go and stops
generating. Each client speaks one wire protocol. Requests come in the OpenAI
chat-completions shape, the lingua franca inside tierq; each client translates to its
protocol and back. Every failure becomes a ``BackendError`` whose ``error_class`` is what
the routing policy decides on (retry, escalate, fail).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Self

import httpx

from tierq.config import BackendConfig
from tierq.errors import ErrorClass as ErrorClass  # re-exported: its home before tierq.errors
from tierq.messages import text_of as text_of  # re-exported for the protocol clients
from worker.backends.errors import BackendError, class_for_status, error_info, parse_retry_after

# A liveness probe must not tie a worker up for a model-sized read timeout.
LIVENESS_READ_TIMEOUT = 5.0
# Idle connections kept per client. A worker keeps up to the backends' max_concurrency
# calls in flight at once on one event loop, so the pool never caps how many connections
# are open (httpx's default of 100 would queue calls in the pool); it caps only how many
# idle ones are kept for the next calls.
KEEPALIVE_CONNECTIONS = 256


# A piece of a streamed answer, as OpenAI streams it: a chunk's ``choices[0].delta``, with
# ``content``, ``tool_calls`` (each with its ``index``; id, type and function name on the
# first piece, argument text after), ``refusal``. Every protocol's stream is told in it.
Delta = dict[str, Any]


@dataclass(frozen=True)
class ChatAnswer:
    """An answer in OpenAI's vocabulary, whatever protocol it came over.

    Token counts the server did not report are None (unknown), never 0. ``extra`` keeps the
    message fields a server adds (reasoning_content, audio, ...) so they reach the client.
    """

    content: str | None
    finish_reason: str  # OpenAI vocabulary: stop, length, tool_calls, content_filter
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Choices after the first, as the server sent them (a request with n > 1).
    more_choices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """What a person reads: the content, else the refusal."""
        return self.content or self.refusal or ""

    def message(self, prefix: str = "") -> dict[str, Any]:
        """The assistant message; ``prefix`` goes before its text (a degraded tier's notice)."""
        content = self.content
        if prefix:  # also before tool calls: a streamed answer showed it first
            content = prefix + (content or "")
        message: dict[str, Any] = {**self.extra, "role": "assistant", "content": content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.refusal is not None:
            message["refusal"] = self.refusal
        return message


@dataclass
class ServerSentEvent:
    event: str | None
    data: str


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events from a response's lines (the parts of the spec LLM APIs use)."""
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data or event:
                yield ServerSentEvent(event, "\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            continue  # a comment, used as a keep-alive
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield ServerSentEvent(event, "\n".join(data))


def dict_at(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` if it is an object, else an empty one (optional parts of answers)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def count_of(value: Any) -> int | None:
    """A token count the server reported, or None: not reported is unknown, not zero."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# No tokenizer of a common model packs more than this many bytes of ordinary text into one
# token on average (English runs ~4; only long runs of whitespace or repeats pack more), so
# bytes / this is a lower bound of a prompt's tokens: a prompt above the context window by
# that count cannot fit, and is refused before the call.
MAX_BYTES_PER_TOKEN = 8


def prompt_tokens_at_least(request: Mapping[str, Any]) -> int:
    """A lower bound of the prompt's tokens: the messages' text, bytes / MAX_BYTES_PER_TOKEN."""
    size = sum(
        len(text_of(m.get("content")).encode("utf-8", "replace"))
        for m in request.get("messages") or []
        if isinstance(m, dict)
    )
    return size // MAX_BYTES_PER_TOKEN


def max_tokens_of(request: Mapping[str, Any]) -> int | None:
    value = request.get("max_completion_tokens", request.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def pool_limits(config: BackendConfig) -> httpx.Limits:
    """No cap on open connections; idle ones kept for at least ``max_concurrency`` calls."""
    keepalive = max(KEEPALIVE_CONNECTIONS, config.max_concurrency)
    return httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)


class BackendClient(ABC):
    """One backend (a BackendConfig) spoken to over one wire protocol.

    Calls run on the event loop of the ``httpx.AsyncClient`` under it, and any number of
    them at once; give each worker event loop its own client (or its own shared pool).
    """

    liveness_path: ClassVar[str]  # the protocol's cheapest endpoint that proves the server up

    def __init__(self, config: BackendConfig, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        # A shared client (connection pool) is welcome; the timeouts travel per request.
        self._http = http or httpx.AsyncClient(limits=pool_limits(config))
        self._owns_http = http is None
        self.timeout = httpx.Timeout(
            config.read_timeout, connect=config.connect_timeout, pool=config.read_timeout
        )
        self.liveness_timeout = httpx.Timeout(
            min(config.read_timeout, LIVENESS_READ_TIMEOUT), connect=config.connect_timeout
        )
        key = config.api_key
        self._secret = key.get_secret_value() if key is not None else None

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the protocol -----------------------------------------------------------------
    # ``model`` replaces the configured model for one call (a tier's degrade.model);
    # ``timeout`` caps every timeout of the call at that many seconds (a job's deadline).
    # Cancelling the task that awaits a call raises CancelledError in it (never a
    # BackendError) and closes the call's connection.
    @abstractmethod
    async def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        """Answer an OpenAI-shaped chat request with this backend's configured model."""

    @abstractmethod
    async def stream(
        self,
        request: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_delta: Callable[[Delta], None],
    ) -> ChatAnswer:
        """Like ``chat``, streamed: ``on_delta`` gets each delta (text, tool-call pieces), in
        order, as it arrives.

        Errors, including those reported mid-stream and a stream that ends without the
        server's finish (the finish reason, [DONE], message_stop, a done line), raise
        BackendError: the deltas already given are then not an answer.
        """

    def check_fits(self, request: Mapping[str, Any]) -> None:
        """Refuse, without a call, a prompt that cannot fit the configured context_window
        (the same error the server would give, so the policy treats both alike)."""
        window = self.config.context_window
        if window is not None and (least := prompt_tokens_at_least(request)) > window:
            self.fail(
                ErrorClass.CONTEXT_LENGTH,
                f"the prompt is at least {least} tokens, over the context window of {window}",
            )

    def timeout_within(self, seconds: float | None) -> httpx.Timeout:
        """The backend's timeouts, none longer than ``seconds`` (None: as configured)."""
        if seconds is None:
            return self.timeout
        limit = max(seconds, 0.001)  # httpx takes 0 as "fail at once", which it is not yet
        return httpx.Timeout(
            min(self.config.read_timeout, limit),
            connect=min(self.config.connect_timeout, limit),
            pool=min(self.config.read_timeout, limit),
        )

    async def live(self) -> bool:
        """Whether the protocol's cheap liveness endpoint answers 2xx right now."""
        try:
            await self.check_live()
        except BackendError:
            return False
        return True

    async def check_live(self) -> None:
        """Like ``live``, but raises the BackendError, for the health record."""
        with self.translate_errors():
            response = await self._http.get(
                self.url(self.liveness_path), headers=self.headers(), timeout=self.liveness_timeout
            )
            if not response.is_success:
                self.raise_for_answer(response.status_code, response.headers, response.content)

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """Protocol and authentication headers."""

    # -- helpers for the protocol clients --------------------------------------------
    def url(self, path: str) -> str:
        """The base URL plus ``path``; a base already ending in /v1 is not given another."""
        base = self.config.url.rstrip("/")
        if path.startswith("/v1/") and re.search(r"/v\d+$", base):
            path = path[3:]
        return base + path

    async def post_json(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Any:
        """POST and return the decoded JSON of a 2xx answer; raise BackendError otherwise."""
        timeout = timeout or self.timeout
        with self.translate_errors(timeout):
            response = await self._http.post(
                self.url(path), json=body, headers=self.headers(), timeout=timeout
            )
            if not response.is_success:
                self.raise_for_answer(response.status_code, response.headers, response.content)
            try:
                return response.json()
            except ValueError:
                self.fail(
                    ErrorClass.MALFORMED, "the answer is not valid JSON", response.status_code
                )

    @asynccontextmanager
    async def open_stream(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> AsyncIterator[httpx.Response]:
        """POST for a streamed answer; a non-2xx answer is read and raised as BackendError.

        The response is closed however the block ends, a cancelled task included: the
        connection goes, and the server sees its client leave.
        """
        request = self._http.build_request(
            "POST",
            self.url(path),
            json=body,
            headers=self.headers(),
            timeout=timeout or self.timeout,
        )
        response = await self._http.send(request, stream=True)
        try:
            if not response.is_success:
                await response.aread()
                self.raise_for_answer(response.status_code, response.headers, response.content)
            yield response
        finally:
            await response.aclose()

    @contextmanager
    def translate_errors(self, timeout: httpx.Timeout | None = None) -> Iterator[None]:
        """Turn transport failures into BackendErrors, so callers see one exception type.

        A cancelled call's CancelledError goes through untouched: it is not a failure.
        """
        try:
            yield
        except httpx.TimeoutException as exc:
            limit = _limit_of(exc, timeout or self.timeout)
            self.fail(ErrorClass.TIMEOUT, f"{_kind_of(exc)} after {limit}s", cause=exc)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            error_class = (
                ErrorClass.MALFORMED if isinstance(exc, httpx.DecodingError) else ErrorClass.CONNECT
            )
            self.fail(error_class, f"{type(exc).__name__}: {exc}", cause=exc)

    def raise_for_answer(self, status: int, headers: Mapping[str, str], body: bytes) -> NoReturn:
        info = error_info(body)
        error_class = class_for_status(status, info)
        retry_after = parse_retry_after(headers)
        detail = info.message or "(no message)"
        self.fail(error_class, f"HTTP {status}: {detail}", status, retry_after)

    def fail(
        self,
        error_class: ErrorClass,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Raise a BackendError naming this backend, with any trace of the key removed."""
        text = self.redact(f"{self.config.name}: {message}")
        raise BackendError(error_class, text, status, retry_after) from cause

    def malformed(self, what: str) -> NoReturn:
        self.fail(ErrorClass.MALFORMED, f"unexpected answer shape: {what}", 200)

    def redact(self, text: str) -> str:
        # Backends sometimes echo the key they rejected; it must not reach logs or the DB.
        if self._secret:
            text = text.replace(self._secret, "[redacted]")
        return text


def _limit_of(exc: httpx.TimeoutException, timeout: httpx.Timeout) -> float:
    limit = timeout.connect if isinstance(exc, httpx.ConnectTimeout) else timeout.read
    return limit if limit is not None else math.inf


def _kind_of(exc: httpx.TimeoutException) -> str:
    return {
        httpx.ConnectTimeout: "connect timeout",
        httpx.ReadTimeout: "read timeout",
        httpx.WriteTimeout: "write timeout",
        httpx.PoolTimeout: "timed out waiting for a pooled connection",
    }.get(type(exc), "timeout")
