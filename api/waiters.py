"""Long-poll wake-ups: one LISTEN connection per API process fans out to waiting requests.

On SQLite (the zero-install default) there is no LISTEN, so waiters re-check on a slow
timer instead; on Postgres the timer is only a safety net for a dropped listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import psycopg

from tierq.events import JOB_ENDED_CHANNEL

log = logging.getLogger(__name__)
SQLITE_RECHECK = 0.25
SAFETY_RECHECK = 5.0


class JobWaiters:
    def __init__(self, listen_dsn: str | None) -> None:
        self._dsn = listen_dsn
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    @property
    def recheck_seconds(self) -> float:
        return SAFETY_RECHECK if self._dsn else SQLITE_RECHECK

    def start(self) -> None:
        if self._dsn and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, job_id: str):  # type: ignore[no-untyped-def]
        event = asyncio.Event()
        self._events[job_id].add(event)
        try:
            yield event
        finally:
            self._events[job_id].discard(event)
            if not self._events[job_id]:
                del self._events[job_id]

    def _wake(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

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
                await asyncio.sleep(1)
