"""Wake-ups for requests that wait on a job: long-polls, waiting chat calls, event streams.

Waiting costs nothing per waiter: a waiter holds an ``asyncio.Event`` and re-reads its job
only when that is set. What sets it is shared by every waiter of the API process:

- on Postgres, one LISTEN connection: every event and every end of a job notifies
  (``tierq.events``), and the listener fans the notification out to the job's waiters;
- on every database, one poller: each tick, one query reads the status and the latest event
  of every job somebody waits on, and wakes the waiters of the jobs that changed since the
  last tick. On SQLite (no LISTEN) it ticks every ``SQLITE_RECHECK``; on Postgres every
  ``SAFETY_RECHECK``, a net under a listener that missed notifications.

Its database work runs on a thread of its own limiter, so a thread pool saturated by
requests never delays a wake-up. Live token streams (Redis) are followed the same way, by
one reader per process (``api.stream_reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg
from sqlalchemy import func, select

from api.stream_reader import StreamReader
from tierq.db import get_engine
from tierq.events import JOB_ENDED_CHANNEL
from tierq.models import Job, JobEvent

log = logging.getLogger(__name__)
SQLITE_RECHECK = 0.25  # seconds between polls without LISTEN: a wake-up's latency
SAFETY_RECHECK = 5.0  # seconds between polls under a listener
POLL_BATCH = 5000  # job ids per statement: SQLite binds at most 32766 parameters
LISTENER_RETRY = 1.0
T = TypeVar("T")

Version = tuple[str, int]  # a job's status and its latest event id: any change moves it


def to_wake(seen: Mapping[str, Version], now: Mapping[str, Version]) -> set[str]:
    """The jobs whose waiters must read them again: those that changed since the last
    poll, and those polled for the first time (they may have changed between their waiter's
    own read and this poll: one read more per waiter, a net under a listener too)."""
    return {job_id for job_id, version in now.items() if seen.get(job_id) != version}


def _versions(job_ids: list[str]) -> dict[str, Version]:
    """Status and latest event id of each job, in one statement per POLL_BATCH ids."""
    latest = select(func.max(JobEvent.id)).where(JobEvent.job_id == Job.id).scalar_subquery()
    found: dict[str, Version] = {}
    with get_engine().connect() as conn:
        for start in range(0, len(job_ids), POLL_BATCH):
            batch = [uuid.UUID(j) for j in job_ids[start : start + POLL_BATCH]]
            rows = conn.execute(select(Job.id, Job.status, latest).where(Job.id.in_(batch)))
            found.update({str(job_id): (status, last or 0) for job_id, status, last in rows})
    return found


async def first_of(*events: asyncio.Event, timeout: float) -> bool:
    """Wait until one of ``events`` is set, at most ``timeout`` s; True if one was."""
    if any(e.is_set() for e in events):
        return True
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waits, timeout=max(timeout, 0), return_when="FIRST_COMPLETED")
    finally:
        for wait in waits:
            wait.cancel()
    return bool(done)


class JobWaiters:
    def __init__(self, listen_dsn: str | None) -> None:
        self._dsn = listen_dsn
        self._events: dict[str, set[asyncio.Event]] = {}
        self._seen: dict[str, Version] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._streams: StreamReader | None = None

    @property
    def poll_seconds(self) -> float:
        return SAFETY_RECHECK if self._dsn else SQLITE_RECHECK

    def start(self) -> None:
        """Start the listener and the poller on the running loop (at most once)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._limiter = anyio.CapacityLimiter(1)
        self._tasks.append(loop.create_task(self._poll_forever()))
        if self._dsn:
            self._tasks.append(loop.create_task(self._listen_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._streams is not None:
            await self._streams.stop()

    @property
    def streams(self) -> StreamReader:
        """The process's reader of live token streams (only where ``streams.available()``)."""
        if self._streams is None:
            self._streams = StreamReader()
        return self._streams

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job may have changed; the caller clears it before it
        reads the job, so a change during the read sets it again."""
        self.start()  # an application run without its lifespan still gets wake-ups
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._events.get(job_id, set())
            waiting.discard(event)
            if not waiting:
                self._events.pop(job_id, None)
                self._seen.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self._poll_once()
            except Exception as exc:
                log.warning("job poller failed (%s); retrying", type(exc).__name__)

    async def _poll_once(self) -> None:
        job_ids = list(self._events)
        if not job_ids:
            return
        now = await anyio.to_thread.run_sync(_versions, job_ids, limiter=self._limiter)
        for job_id in to_wake(self._seen, now):
            self._wake(job_id)
        self._seen = {j: v for j, v in now.items() if j in self._events}

    async def _listen_forever(self) -> None:
        assert self._dsn
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=3
                ) as conn:
                    await conn.execute(f"LISTEN {JOB_ENDED_CHANNEL}")
                    # Whatever ended while we were not listening: wake everyone to re-check.
                    for job_id in list(self._events):
                        self._wake(job_id)
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job listener lost (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(LISTENER_RETRY)


async def read_off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread, abandoned (not awaited) if the waiter is cancelled:
    a wait's deadline is never pushed back by a read that queued behind busy threads."""
    return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
