"""A worker process's backend calls in flight: many at once, on one event loop, each one
stoppable.

Celery runs each job in a thread of its pool (``-P threads``); the thread does the job's
database work and hands the backend call to this process's one asyncio loop, then waits for
it without holding a database connection. Hundreds of calls cost one loop and their sockets,
not a process each: a GPU server's batch stays full.

A call is stopped by cancelling its task (the HTTP connection closes, so the server stops
generating); its thread then gets ``Stopped`` back, only once the call has really ended, and
only then frees its call slot. The lease keeper (``worker.lease_keeper``) decides what to
stop; ``stop_all`` is the worker's shutdown.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tierq.leases import Lease
from tierq.policy import Stopped, StopReason
from worker.backends.base import ChatAnswer, Delta

_END = object()  # the end of a call's queue of deltas
# A backend call: given where to emit streamed text deltas, the answer.
Call = Callable[[Callable[[Delta], None]], Awaitable[ChatAnswer]]


@dataclass
class _Running:
    lease: Lease
    task: asyncio.Task[ChatAnswer | Stopped] | None = None
    why: StopReason | None = None


class Calls:
    """The process's call loop (a daemon thread) and its registry of calls in flight."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._running: dict[uuid.UUID, _Running] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, name="calls", daemon=True)
        self._thread.start()

    def leases(self) -> list[Lease]:
        with self._lock:
            return [running.lease for running in self._running.values()]

    def run(
        self, lease: Lease, call: Call, on_delta: Callable[[Delta], None] | None = None
    ) -> ChatAnswer | Stopped:
        """Run ``call(emit)`` on the loop and wait for it; raises what the call raises.

        A streamed call emits each delta; ``on_delta`` gets them here, in this thread
        (it writes to Redis, which must not block the loop), in order, as they arrive."""
        running = _Running(lease)
        deltas: queue.SimpleQueue[object] = queue.SimpleQueue()
        with self._lock:
            self._running[lease.job_id] = running
        try:
            guarded = self._guarded(running, call, deltas.put)
            future = asyncio.run_coroutine_threadsafe(guarded, self._loop)
            # Runs on the loop after the call's last delta: the queue's end, in order.
            future.add_done_callback(lambda _: deltas.put(_END))
            while (item := deltas.get()) is not _END:
                if on_delta is not None:
                    on_delta(item)  # type: ignore[arg-type]
            return future.result()
        finally:
            with self._lock:
                self._running.pop(lease.job_id, None)

    async def _guarded(
        self, running: _Running, call: Call, emit: Callable[[Delta], None]
    ) -> ChatAnswer | Stopped:
        running.task = asyncio.current_task()  # type: ignore[assignment]
        if running.why is not None:  # stopped before it started
            return Stopped(running.why)
        try:
            return await call(emit)
        except asyncio.CancelledError:
            if running.why is None:
                raise
            return Stopped(running.why)

    def stop(self, job_id: uuid.UUID, why: StopReason) -> bool:
        """Abort the job's call, if it is in flight here; its thread gets ``Stopped(why)``."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None or running.why is not None:
                return False
            running.why = why
        self._loop.call_soon_threadsafe(_cancel, running)
        return True

    def stop_all(self, why: StopReason) -> int:
        with self._lock:
            ids = list(self._running)
        return sum(self.stop(job_id, why) for job_id in ids)


def _cancel(running: _Running) -> None:
    if running.task is not None:
        running.task.cancel()
