"""What every backend client shares: the answer, the error classes, HTTP and error mapping.

Clients are synchronous (Celery prefork workers are) and speak one wire protocol each.
Requests come in the OpenAI chat-completions shape, the lingua franca inside tierq; each
client translates to its protocol and back. Every failure becomes a ``BackendError`` whose
``error_class`` is what the routing policy decides on (retry, escalate, fail).
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, ClassVar, NoReturn

import httpx

from tierq.config import BackendConfig

# A liveness probe must not tie a worker up for a model-sized read timeout.
LIVENESS_READ_TIMEOUT = 5.0
# How much of a backend's error text ends up in a message (HTML error pages are long).
MAX_DETAIL = 300


class ErrorClass(StrEnum):
    CONNECT = "connect"  # refused, reset, dropped mid-answer: the server is not there
    TIMEOUT = "timeout"  # connect or read timeout
    SERVER = "server"  # 5xx other than overload
    OVERLOADED = "overloaded"  # 503, 529: up but shedding load
    RATE_LIMITED = "rate_limited"  # 429, usually with Retry-After
    MALFORMED = "malformed"  # 2xx whose body is not the protocol's shape
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit this backend's model
    CLIENT = "client"  # any other 4xx: the request itself is wrong for this backend

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again (here or on a peer)."""
        return self not in (ErrorClass.CONTEXT_LENGTH, ErrorClass.CLIENT)


class BackendError(Exception):
    """A failed backend call. The message never contains credentials."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = ErrorClass(error_class)
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.error_class.retryable

    def __str__(self) -> str:
        return f"{self.error_class}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"BackendError({self.error_class.value!r}, {self.message!r}, "
            f"status={self.status!r}, retry_after={self.retry_after!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles exceptions across processes; keep every field, not just args.
        return (type(self), (self.error_class, self.message, self.status, self.retry_after))


@dataclass(frozen=True)
class ChatAnswer:
    content: str
    finish_reason: str  # OpenAI vocabulary: stop, length, tool_calls, content_filter
    prompt_tokens: int
    completion_tokens: int
    model: str


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date).

    A date in the past means 0; anything unparsable means None (no advice).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    millis = _non_negative(lower.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = lower.get("retry-after")
    if value is None:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    return _seconds_until(value)


def _non_negative(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _seconds_until(date: str) -> float | None:
    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # HTTP-dates are always GMT; one without a zone is not an HTTP-date
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


# Phrases the common servers use for a prompt that does not fit (OpenAI, vLLM, llama.cpp,
# TGI, Ollama, Anthropic); matched only on error answers, never on model output.
_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|context window|context size|maximum context|prompt is too long"
    r"|input length exceeds|too many tokens|max_new_tokens` must be",
    re.IGNORECASE,
)
_CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error"}


def is_context_length(message: str, code: str | None = None) -> bool:
    return code in _CONTEXT_CODES or bool(_CONTEXT_PATTERNS.search(message))


@dataclass(frozen=True)
class ErrorInfo:
    """What a backend said about an error: its text and its machine-readable kind."""

    message: str
    code: str | None = None  # OpenAI ``code``, Anthropic ``error.type``, llama.cpp ``type``


def error_info(body: bytes) -> ErrorInfo:
    """The message and code of any of the error envelopes in use, or the raw text."""
    try:
        data = json.loads(body)
    except ValueError:
        return ErrorInfo(body.decode("utf-8", "replace").strip()[:MAX_DETAIL])
    return error_info_of(data) or ErrorInfo(body.decode("utf-8", "replace").strip()[:MAX_DETAIL])


def error_info_of(data: Any) -> ErrorInfo | None:
    """``{"error": {"message", "code"|"type"}}``, ``{"error": "..."}``, ``{"message": ...}``."""
    if not isinstance(data, dict):
        return None
    error = data.get("error", data)
    if isinstance(error, str):
        return ErrorInfo(error[:MAX_DETAIL])
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    code = error.get("code")
    if not isinstance(code, str):
        code = error.get("type") if isinstance(error.get("type"), str) else None
    return ErrorInfo(error["message"][:MAX_DETAIL], code)


def class_for_status(status: int, info: ErrorInfo) -> ErrorClass:
    if status == 429 or info.code == "rate_limit_error":
        return ErrorClass.RATE_LIMITED
    if status in (503, 529) or info.code == "overloaded_error":
        return ErrorClass.OVERLOADED
    if status == 408:
        return ErrorClass.TIMEOUT  # the server gave up waiting for us: try again
    if status >= 500:
        return ErrorClass.SERVER
    if 400 <= status < 500:
        if is_context_length(info.message, info.code):
            return ErrorClass.CONTEXT_LENGTH
        return ErrorClass.CLIENT
    return ErrorClass.MALFORMED  # 1xx/3xx where an answer was due


def class_for_stream_error(info: ErrorInfo) -> ErrorClass:
    """An error reported inside a 200 stream, where there is no status to go by."""
    if info.code in ("overloaded_error", "engine_overloaded"):
        return ErrorClass.OVERLOADED
    if info.code in ("rate_limit_error", "rate_limit_exceeded"):
        return ErrorClass.RATE_LIMITED
    if is_context_length(info.message, info.code):
        return ErrorClass.CONTEXT_LENGTH
    return ErrorClass.SERVER


@dataclass
class ServerSentEvent:
    event: str | None
    data: str


def iter_sse(lines: Iterator[str]) -> Iterator[ServerSentEvent]:
    """Server-sent events from a response's lines (the parts of the spec LLM APIs use)."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
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


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def max_tokens_of(request: Mapping[str, Any]) -> int | None:
    value = request.get("max_completion_tokens", request.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class BackendClient(ABC):
    """One backend (a BackendConfig) spoken to over one wire protocol.

    Thread-compatible like the ``httpx.Client`` under it; give each worker process its own.
    """

    liveness_path: ClassVar[str]  # the protocol's cheapest endpoint that proves the server up

    def __init__(self, config: BackendConfig, http: httpx.Client | None = None) -> None:
        self.config = config
        # A shared client (connection pool) is welcome; the timeouts travel per request.
        self._http = http or httpx.Client()
        self._owns_http = http is None
        self.timeout = httpx.Timeout(
            config.read_timeout, connect=config.connect_timeout, pool=config.read_timeout
        )
        self.liveness_timeout = httpx.Timeout(
            min(config.read_timeout, LIVENESS_READ_TIMEOUT), connect=config.connect_timeout
        )
        key = config.api_key
        self._secret = key.get_secret_value() if key is not None else None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the protocol -----------------------------------------------------------------
    # ``model`` replaces the configured model for one call (a tier's degrade.model);
    # ``timeout`` caps every timeout of the call at that many seconds (a job's deadline).
    @abstractmethod
    def chat(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> ChatAnswer:
        """Answer an OpenAI-shaped chat request with this backend's configured model."""

    @abstractmethod
    def stream(
        self, request: dict[str, Any], *, model: str | None = None, timeout: float | None = None
    ) -> Generator[str, None, ChatAnswer]:
        """Yield text deltas as they arrive; the generator returns the ChatAnswer.

        Nothing is sent before the first ``next()``; closing the generator early closes
        the connection. Errors, including those reported mid-stream, raise BackendError.
        """

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

    def live(self) -> bool:
        """Whether the protocol's cheap liveness endpoint answers 2xx right now."""
        try:
            self.check_live()
        except BackendError:
            return False
        return True

    def check_live(self) -> None:
        """Like ``live``, but raises the BackendError, for the health record."""
        with self.translate_errors():
            response = self._http.get(
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

    def post_json(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Any:
        """POST and return the decoded JSON of a 2xx answer; raise BackendError otherwise."""
        timeout = timeout or self.timeout
        with self.translate_errors(timeout):
            response = self._http.post(
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

    @contextmanager
    def open_stream(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> Iterator[httpx.Response]:
        """POST for a streamed answer; a non-2xx answer is read and raised as BackendError."""
        request = self._http.build_request(
            "POST",
            self.url(path),
            json=body,
            headers=self.headers(),
            timeout=timeout or self.timeout,
        )
        response = self._http.send(request, stream=True)
        try:
            if not response.is_success:
                response.read()
                self.raise_for_answer(response.status_code, response.headers, response.content)
            yield response
        finally:
            response.close()

    @contextmanager
    def translate_errors(self, timeout: httpx.Timeout | None = None) -> Iterator[None]:
        """Turn transport failures into BackendErrors, so callers see one exception type."""
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
