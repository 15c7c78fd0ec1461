"""Per-key limits: one API key must not take a deployment from the others.

Three limits per key, each the key's own (``api_keys.rps``, ``max_jobs``, ``max_waiters``,
set by ``tierq keys create NAME --rps N --max-jobs N --max-waiters N``) or, where that is
NULL, the default from settings (``TIERQ_KEY_RPS``, ...); 0 means no limit:

- ``rps``, requests per second: a token bucket per key in each API process, holding
  ``BURST_SECONDS`` of the rate. Checked with the key, before anything else is read.
  Per process, so N API processes let a key through N times its rate: what this limit
  protects is each process's event loop and thread pool, which are per process too.
- ``jobs``, jobs queued or running at once (every status that is not final: waiting to
  retry and parked count too): counted in the database at submit, before anything is
  written. The count and the insert are two statements, so submits of one key that race
  may pass it together: the overshoot is at most the key's submits in flight at once.
  An ``Idempotency-Key`` replay adds no job and is never refused.
- ``waiters``: long-polls (``?wait=``), event streams and chat calls waiting for their
  answer, at once, counted in each API process (they are held by it).

Over a limit: 429 with ``Retry-After``, a problem+json whose ``limit`` names it (and an
OpenAI ``error`` with code ``rate_limit_exceeded``), counted in ``/metrics``
(``tierq_key_limit_refusals_total{limit}``). Nothing is written for a refused request.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from starlette.types import Receive, Scope, Send

from api.problems import Problem
from tierq.db import transaction
from tierq.metrics import count_refusal
from tierq.models import ACTIVE_STATUSES, Job
from tierq.settings import Settings, get_settings

if TYPE_CHECKING:
    from api.auth import Caller

BURST_SECONDS = 2.0  # a full bucket holds this many seconds of the key's rate
JOBS_RETRY_AFTER = 5  # seconds: a slot frees when one of the key's jobs ends
WAITERS_RETRY_AFTER = 2  # seconds: long-polls and streams end or time out all the time
MAX_BUCKETS = 10_000  # past this many keys in one process, idle buckets are dropped
FORGET_AFTER = 60.0  # seconds a bucket must have been idle to be dropped


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits; None: the default from settings; 0: no limit."""

    rps: float | None = None
    max_jobs: int | None = None
    max_waiters: int | None = None

    def resolved(self, settings: Settings) -> KeyLimits:
        return KeyLimits(
            settings.key_rps if self.rps is None else self.rps,
            settings.key_max_jobs if self.max_jobs is None else self.max_jobs,
            settings.key_max_waiters if self.max_waiters is None else self.max_waiters,
        )


DEFAULTS = KeyLimits()  # a key with no limits of its own


def limits_of(caller: Caller) -> KeyLimits:
    return caller.limits.resolved(get_settings())


# -- decisions (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float  # the clock reading the tokens are counted at


def take_token(bucket: Bucket | None, rate: float, now: float) -> tuple[Bucket, float]:
    """The bucket after a request at ``now``, and how many seconds until one could pass
    (0.0: this one passes). A new key starts with a full bucket."""
    capacity = max(rate * BURST_SECONDS, 1.0)
    tokens = capacity if bucket is None else min(capacity, bucket.tokens + (now - bucket.at) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


def refusal(limit: str, detail: str, retry_after: float) -> Problem:
    """The 429 for ``limit`` (rps, jobs or waiters); counted for /metrics."""
    count_refusal(limit)
    seconds = max(1, math.ceil(retry_after))
    error = {"message": detail, "type": "rate_limit_error", "param": None,
             "code": "rate_limit_exceeded"}  # fmt: skip
    return Problem(
        429, "Too many requests", detail, headers={"Retry-After": str(seconds)},
        limit=limit, retry_after=seconds, error=error,
    )  # fmt: skip


# -- per process: request rate and waiters -------------------------------------------------


class KeyLimiter:
    """The per-process half: each key's token bucket and its waiters now. Used from the
    event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self.buckets: dict[uuid.UUID, Bucket] = {}
        self.waiters: Counter[uuid.UUID] = Counter()

    def admit_request(self, caller: Caller, now: float) -> None:
        rate = limits_of(caller).rps
        if not rate:
            return
        bucket, wait = take_token(self.buckets.get(caller.key_id), rate, now)
        self.buckets[caller.key_id] = bucket
        if len(self.buckets) > MAX_BUCKETS:
            self._forget_idle(now)
        if wait:
            detail = f"This key may send {rate:g} requests per second (limit rps)."
            raise refusal("rps", detail, wait)

    def _forget_idle(self, now: float) -> None:
        # A bucket idle this long has refilled (at any rate above one request a minute):
        # forgetting it is the same as keeping it full.
        idle = [key for key, bucket in self.buckets.items() if now - bucket.at > FORGET_AFTER]
        for key in idle:
            del self.buckets[key]

    def hold_waiter(self, caller: Caller) -> None:
        most = limits_of(caller).max_waiters
        if most and self.waiters[caller.key_id] >= most:
            detail = (
                f"This key has {most} requests waiting at once on this API process "
                "(long-polls, event streams, chat calls waiting for their answer; "
                "limit waiters)."
            )
            raise refusal("waiters", detail, WAITERS_RETRY_AFTER)
        self.waiters[caller.key_id] += 1

    def release_waiter(self, caller: Caller) -> None:
        self.waiters[caller.key_id] -= 1
        if self.waiters[caller.key_id] <= 0:
            del self.waiters[caller.key_id]


def limiter(app: FastAPI) -> KeyLimiter:
    """The application's limiter, made on first use (one application per API process)."""
    found = getattr(app.state, "key_limiter", None)
    if found is None:
        found = app.state.key_limiter = KeyLimiter()
    return found


def admit_request(request: Request, caller: Caller) -> None:
    limiter(request.app).admit_request(caller, time.monotonic())


class WaiterSlot:
    """One of a key's waiters, held until released (at most once)."""

    def __init__(self, held: KeyLimiter, caller: Caller) -> None:
        held.hold_waiter(caller)  # 429 if the key has no waiter free
        self._held, self._caller = held, caller
        self.handed_over = False

    def release(self) -> None:
        if self._held is not None:
            self._held.release_waiter(self._caller)
            self._held = None

    def stream(self, content: Any, **kwargs: Any) -> StreamingResponse:
        """A streamed response that holds this slot until it has ended, however it ends
        (its generator never even starts when the client is gone before the headers)."""
        response = _HeldStream(content, self.release, **kwargs)
        self.handed_over = True
        return response


class _HeldStream(StreamingResponse):
    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@contextlib.contextmanager
def waiting(request: Request, caller: Caller) -> Iterator[WaiterSlot]:
    """Holds one of the key's waiters for the block, or past it in the response the block
    returns from ``slot.stream(...)``; 429 if none is free."""
    slot = WaiterSlot(limiter(request.app), caller)
    try:
        yield slot
    finally:
        if not slot.handed_over:
            slot.release()


# -- in the database: jobs at once ---------------------------------------------------------


def admit_job(caller: Caller, idempotency_key: str | None) -> None:
    """Refuses a submit (429) when the key has ``max_jobs`` jobs that have not ended,
    unless it is the replay of one of them. Reads only; runs on a worker thread."""
    most = limits_of(caller).max_jobs
    if not most:
        return
    mine = Job.owner_id == caller.key_id
    # Counts at most ``most`` rows: a key far over its limit costs no more than one at it.
    active = select(Job.id).where(mine, Job.status.in_(ACTIVE_STATUSES)).limit(most).subquery()
    with transaction() as conn:
        if conn.scalar(select(func.count()).select_from(active)) < most:
            return
        replay = idempotency_key and conn.scalar(
            select(Job.id).where(mine, Job.idempotency_key == idempotency_key)
        )
    if replay:
        return
    detail = f"This key has {most} jobs queued or running at once (limit jobs)."
    raise refusal("jobs", detail, JOBS_RETRY_AFTER)
