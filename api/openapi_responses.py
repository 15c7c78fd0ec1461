"""What each route may answer besides its success, for the OpenAPI document.

Every error is RFC 9457 ``application/problem+json`` (``api.problems``); FastAPI's own 422
(``application/json``, a different body) is replaced wherever it would be declared. The
statuses are named once here and picked per route in its decorator: ``errors(401, 404)``.
``tests/test_contract.py`` holds the document to what the server sends.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends
from fastapi.security import HTTPBearer

from api.problems import PROBLEM_JSON

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

_WHEN = {
    400: "The body is not JSON, or asks for something no backend of its route can do.",
    408: "The body took too long to arrive (TIERQ_BODY_TIMEOUT).",
    401: "No API key, or one that is not valid (or a watch token that is not).",
    403: "The key is not an admin key.",
    404: "No such resource for this key (or an unknown model).",
    409: "The resource is not in a state that allows this.",
    413: "The body is over TIERQ_MAX_BODY_BYTES.",
    415: "The body is not `application/json`.",
    422: "The request is not valid: `errors` names each field.",
    429: "Too many requests for this key: retry after `Retry-After` seconds.",
    431: "The request line and headers are over TIERQ_MAX_HEADER_BYTES.",
    500: "The job was given up after repeated deliveries.",
    502: "The job failed on its backends.",
    503: "The database is unavailable (nothing was accepted): retry after `Retry-After`.",
    504: "No answer in time; the job keeps running.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that may answer with these statuses, each a problem."""
    return {
        status: {
            "description": _WHEN[status],
            "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}},
        }
        for status in statuses
    }


# The statuses every route of a kind shares.
KEYED = (401, 429, 431, 503)  # needs a key, reads the database (api.limits: headers)
WITH_BODY = (400, 408, 413, 415, 422)  # reads a JSON body (api.limits: its size, type, pace)


def keyed(*statuses: int, body: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route that needs a key, plus ``statuses``; ``body``: it reads a JSON body too."""
    return errors(*sorted({*KEYED, *(WITH_BODY if body else ()), *statuses}))


# One event of a stream, as OpenAPI 3.1 reads ``schema`` under text/event-stream.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "id": {"type": "string"},
        "data": {"type": "string", "description": "JSON, or [DONE] ending a chat stream."},
    },
}


def event_stream(description: str) -> dict[str, Any]:
    """A 200 that is a stream of Server-Sent Events."""
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }


# Declares the API key in the document (Swagger UI's Authorize, clients' generators, the
# contract test's auth checks). It checks nothing: api.auth.current_caller does.
API_KEY = Depends(
    HTTPBearer(
        auto_error=False,
        scheme_name="apiKey",
        description="An API key (`tierq keys create NAME`) as `Authorization: Bearer tq_...`.",
    )
)
