"""A 405 names every method its path has, in ``Allow`` (RFC 9110).

Starlette answers a method a path lacks from the first route whose path matches, so
``DELETE /v1/jobs`` said ``Allow: POST`` although ``GET /v1/jobs`` exists too: each method
of a path is a route of its own. Here the methods come from the OpenAPI document, the same
list a client reads there (HEAD with GET: Starlette answers it for every GET route).
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.problems import problem_response

_PARAMETER = re.compile(r"\\\{[^/]+?\\\}")  # an escaped {name} in re.escape(template)


def allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = _PARAMETER.sub("[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def method_not_allowed(request: Request, exc: HTTPException) -> JSONResponse:
    # A path outside the document (/openapi.json, /docs) keeps what Starlette said.
    allow = ", ".join(allowed_methods(request)) or (exc.headers or {}).get("Allow", "")
    return problem_response(
        405,
        "Method Not Allowed",
        f"{request.method} is not one of this path's methods: {allow}.",
        headers={"Allow": allow},
    )
