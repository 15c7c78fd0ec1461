"""Request limits, enforced before anything costs.

An ASGI middleware in front of the whole application refuses, before the body is parsed
and before the key is checked (so an anonymous client costs no key lookup either):

- a request line and headers over ``TIERQ_MAX_HEADER_BYTES``: 431. uvicorn (h11, see
  ``tierq api``) bounds the memory headers take while they arrive, but only refuses them
  once that much is buffered without their end: headers that come in one read from the
  socket (tens of KiB) reach us whole, and are refused here;
- a declared ``Content-Length`` over ``TIERQ_MAX_BODY_BYTES``: 413 at once, nothing read;
- a body that is not ``application/json`` (or has no Content-Type): 415, not 422. Every
  tierq endpoint that takes a body takes JSON; nothing in the content was looked at, and
  415 says exactly which header to fix (RFC 9110 gives it to a media type a resource does
  not take);
- a body that streams in (chunked) past the limit: 413 as soon as the byte count passes
  it, so at most the limit is ever held;
- a body that takes longer than ``TIERQ_BODY_TIMEOUT`` to arrive: 408 (a slow client
  holds a connection and a buffer, never the application).

Refusals close the connection: the client is still sending a body we will not read.
Idle connections are uvicorn's to close (``TIERQ_API_KEEP_ALIVE``); the job's stored size
and its message count are checked with the request (api/schemas.py).

The middleware also records when the request arrived (``arrived_at``): a deadline is
judged against that one instant, however often the request is validated.
"""

from __future__ import annotations

import asyncio
import contextvars
from datetime import UTC, datetime
from email.message import Message

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from api.problems import problem_response
from tierq.settings import MIB

SHOWN_CONTENT_TYPE = 100  # characters of a refused Content-Type echoed back

_ARRIVED: contextvars.ContextVar[datetime | None] = contextvars.ContextVar(
    "tierq_request_arrived", default=None
)


def arrived_at() -> datetime:
    """When the request being handled arrived (now, outside a request)."""
    return _ARRIVED.get() or datetime.now(UTC)


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def _size(limit: int) -> str:
    return f"{limit / MIB:g} MiB" if limit % (MIB // 4) == 0 else f"{limit} bytes"


def _refusal(status: int, title: str, field: str, message: str) -> JSONResponse:
    """A problem+json response that also closes the connection. It carries OpenAI's
    ``error`` object too: these come before routing, so also on the OpenAI surface, where
    the SDK builds its exception's message from ``error.message``."""
    error = {"message": f"{field}: {message}", "type": "invalid_request_error",
             "param": field, "code": None}  # fmt: skip
    return problem_response(
        status, title, f"{field}: {message}", headers={"Connection": "close"},
        errors=[{"field": field, "message": message}], error=error,
    )  # fmt: skip


def _too_large(limit: int) -> JSONResponse:
    message = f"larger than {_size(limit)} (TIERQ_MAX_BODY_BYTES)"
    return _refusal(413, "Content too large", "body", message)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    parsed = Message()
    parsed["content-type"] = content_type
    return parsed.get_content_type() == "application/json"


def _declared_length(headers: Headers) -> int | None:
    """The Content-Length, or None without one; -1 when it is not a number (a server in
    front of us normally refuses that first)."""
    value = headers.get("content-length")
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else -1


def _head_size(scope: Scope) -> int:
    """The request line and headers as they came in, give or take a few bytes of spaces."""
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + 12  # " HTTP/1.1\r\n"
    line += len(scope.get("query_string") or b"") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class RequestLimits:
    """The ASGI middleware; see the module's docstring."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_header_bytes: int, body_timeout: float
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        _ARRIVED.set(datetime.now(UTC))
        if _head_size(scope) > self.max_header_bytes:
            message = f"larger than {_size(self.max_header_bytes)} (TIERQ_MAX_HEADER_BYTES)"
            await _refusal(431, "Headers too large", "headers", message)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = _declared_length(headers)
        if length == 0 or (length is None and "transfer-encoding" not in headers):
            await self.app(scope, receive, send)  # no body: nothing to bound
            return
        refused = self._refuse_early(headers, length)
        if refused is not None:
            await refused(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read(receive)
        except _TooLarge:
            await _too_large(self.max_body_bytes)(scope, receive, send)
            return
        except TimeoutError:
            message = f"not received within {self.body_timeout:g} s (TIERQ_BODY_TIMEOUT)"
            await _refusal(408, "Request timeout", "body", message)(scope, receive, send)
            return
        except _ClientGone:
            return  # nobody to answer
        await self.app(scope, _replay(body, receive), send)

    def _refuse_early(self, headers: Headers, length: int | None) -> JSONResponse | None:
        """The refusal the headers alone decide, if any: nothing of the body is read."""
        if length == -1:
            return _refusal(400, "Invalid request", "Content-Length", "not a number")
        if length is not None and length > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        if not _is_json(headers.get("content-type")):
            sent = (headers.get("content-type") or "none")[:SHOWN_CONTENT_TYPE]
            message = f"must be application/json (got {sent})"
            return _refusal(415, "Unsupported media type", "Content-Type", message)
        return None

    async def _read(self, receive: Receive) -> bytes:
        """The whole body, counted as it arrives: never more than the limit is held.
        Pieces joined once at the end: a growing bytearray over-allocates by an eighth."""
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            piece = message.get("body", b"")
            size += len(piece)
            if size > self.max_body_bytes:
                raise _TooLarge
            pieces.append(piece)
            if not message.get("more_body", False):
                return b"".join(pieces)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the server's own messages (a disconnect: the chat
    routes listen for it while they wait)."""
    sent = False

    async def replayed() -> ASGIMessage:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
