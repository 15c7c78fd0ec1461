"""RFC 9457 problem details: every error the API returns has this one shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
DB_RETRY_AFTER = "5"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int, title: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# Parts of a pydantic error location that name a member of a union type (str | list[str])
# rather than a field: "list[str]", "function-after[_no_nul(), str]", "str", ...
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


# The tags of tagged unions (a message's role, a content part's type) that pydantic puts in
# an error's location before the member's own fields: messages.0.user.content → messages.0.content.
_UNION_TAGS = frozenset(
    {"system", "developer", "user", "assistant", "tool", "text", "image_url", "input_audio",
     "file", "refusal", "json_object", "json_schema"}
)  # fmt: skip


def _is_union_tag(loc: list[Any], i: int) -> bool:
    """A tag stands after a list index or a union-typed field, and before the member's field."""
    if loc[i] not in _UNION_TAGS or i + 1 == len(loc) or i == 0:
        return False
    return isinstance(loc[i - 1], int) or loc[i - 1] == "response_format"


def _location(error: Any) -> tuple[Any, ...]:
    """Where the error is; a tagged union's missing or unknown tag is its tag field's."""
    loc = tuple(error["loc"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return (*loc, str(error.get("ctx", {}).get("discriminator", "")).strip("'"))
    return loc


def _field(loc: tuple[Any, ...]) -> str:
    kept = [
        p
        for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS))
    ]
    parts = [str(p) for i, p in enumerate(kept) if not _is_union_tag(kept, i)]
    return ".".join(parts) or str(loc[0] if loc else "body")


async def _on_problem(_request: Request, exc: Problem) -> JSONResponse:
    return problem_response(exc.status, exc.title, exc.detail, exc.headers, **exc.extra)


def _malformed_json(message: str) -> JSONResponse:
    # A 400, not a 422: there is no field to name until the body parses (FastAPI's own
    # error names the character offset, "body.62", as if it were one).
    errors = [{"field": "body", "message": f"not valid JSON: {message}"}]
    return problem_response(
        400, "Malformed JSON", f"body: not valid JSON: {message}", errors=errors
    )


def _json_error(error: Any, document: Any) -> str:
    """json's message with its line and column (FastAPI passes on only the offset)."""
    message = str(error.get("ctx", {}).get("error", "JSON decode error"))
    offset = error["loc"][-1] if isinstance(error["loc"][-1], int) else None
    if offset is None or not isinstance(document, str | bytes):
        return message
    text = document if isinstance(document, str) else document.decode("utf-8", "replace")
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{message} (line {line}, column {column})"


async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    broken = next((e for e in exc.errors() if e["type"] == "json_invalid"), None)
    if broken is not None:
        return _malformed_json(_json_error(broken, exc.body))
    errors = [
        {"field": _field(_location(e)), "message": e["msg"].removeprefix("Value error, ")}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem_response(422, "Invalid request", detail, errors=errors)


# FastAPI's 400 for a body json cannot even decode (not UTF-8, a number over Python's
# 4300-digit limit): json raised a ValueError that is not a JSONDecodeError.
FASTAPI_UNPARSABLE = "There was an error parsing the body"


async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == FASTAPI_UNPARSABLE:
        cause = exc.__cause__  # json's own words about the client's bytes, nothing else
        return _malformed_json(str(cause) if isinstance(cause, ValueError) else "unreadable")
    return problem_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


async def _on_database_down(_request: Request, exc: Exception) -> JSONResponse:
    # Nothing was committed: the client may retry the same request (with its Idempotency-Key).
    return problem_response(
        503,
        "Database unavailable",
        "The request was not accepted; retry later.",
        headers={"Retry-After": DB_RETRY_AFTER},
    )


async def _on_dbapi(request: Request, exc: DBAPIError) -> JSONResponse:
    if exc.connection_invalidated or isinstance(exc, OperationalError):
        return await _on_database_down(request, exc)
    return await _on_unexpected(request, exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The details go to the log, never to the client: an exception's text can hold SQL,
    # row values or connection strings. The path only: a query string may carry a token.
    log.error(
        "unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc
    )
    return problem_response(
        500, "Internal error", "The server failed to handle the request; the error is logged."
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _on_dbapi)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
