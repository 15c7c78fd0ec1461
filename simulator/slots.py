"""Generation slots: how many requests the simulated model serves at once.

llama.cpp's Python server (llama-cpp-python) generates one answer at a time: the others
wait, and with ``interrupt_requests`` (its default) a newcomer ends the stream in progress
(tests/test_llama_wire.py pins both). The ``slots`` and ``interrupt_streams`` faults copy
that; without them every request is served at once, as vLLM does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class Slots:
    """Requests holding a slot, requests waiting for one, and every request that wanted one.

    Touched only from the instance's event loop: no lock. The limit is read at each try,
    so a fault change applies to waiting requests too (``wake_all``)."""

    def __init__(self) -> None:
        self.busy = 0
        self.arrivals = 0  # requests that wanted the model, ever: what interrupts a stream
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return sum(1 for waiter in self._waiting if not waiter.done())

    @asynccontextmanager
    async def hold(self, limit: Callable[[], int | None]) -> AsyncIterator[int]:
        """Wait for a free slot (``limit()`` of them; None: no limit) and hold it. Yields
        ``arrivals`` as it was once the slot was taken: a stream compares it later."""
        self.arrivals += 1
        await self._acquire(limit)
        try:
            yield self.arrivals
        finally:
            self.busy -= 1
            self._wake_one()

    async def _acquire(self, limit: Callable[[], int | None]) -> None:
        while (cap := limit()) is not None and self.busy >= cap:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:  # the client went away while it waited
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one()  # it had been woken: the next one gets the slot
                raise
        self.busy += 1

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        """The limit changed: every waiting request checks it again."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
