"""Bearer-key authentication. Every row a request touches is filtered by its key's id."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from api import key_limits
from api.key_limits import DEFAULTS, KeyLimits
from api.problems import Problem
from tierq.db import session_scope
from tierq.keys import find_key, hash_key

CACHE_SECONDS = 10.0  # a revoked key stops working within this many seconds


@dataclass(frozen=True)
class Caller:
    key_id: uuid.UUID
    is_admin: bool
    # The key's default for chat clients that disconnect (x-tierq-cancel-on-disconnect).
    cancel_on_disconnect: bool = False
    limits: KeyLimits = DEFAULTS  # the key's own; unset ones: the defaults (settings)


_cache: dict[str, tuple[float, Caller]] = {}


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def _cached(digest: str) -> Caller | None:
    hit = _cache.get(digest)
    return hit[1] if hit and hit[0] > time.monotonic() else None


def _load(key: str, digest: str) -> Caller | None:
    with session_scope() as session:
        row = find_key(session, key)
        caller = None
        if row is not None:
            limits = KeyLimits(row.rps, row.max_jobs, row.max_waiters)
            caller = Caller(row.id, row.is_admin, row.cancel_on_disconnect, limits)
    if caller:
        _cache[digest] = (time.monotonic() + CACHE_SECONDS, caller)
    return caller


async def current_caller(request: Request) -> Caller:
    # async, so a cached key costs no trip through the thread pool on every request
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    digest = hash_key(key)
    caller = _cached(digest) or await run_in_threadpool(_load, key, digest)
    if caller is None:
        raise _unauthorized("The API key is not valid.")
    key_limits.admit_request(request, caller)  # 429 past the key's requests per second
    return caller


def admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if not caller.is_admin:
        raise Problem(403, "Forbidden", "This endpoint needs an admin key.")
    return caller
