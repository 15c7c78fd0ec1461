"""How a backend's failure becomes a BackendError: status codes, error envelopes, advice.

The classes themselves (``ErrorClass``) live in ``tierq.errors``, where the failure policy
reads them without importing the worker.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from tierq.errors import ErrorClass

# How much of a backend's error text ends up in a message (HTML error pages are long).
MAX_DETAIL = 300


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
