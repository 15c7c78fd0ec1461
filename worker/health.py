"""Health probes: the protocol's cheap liveness endpoint, and a tiny real inference (the
canary) where probes cost nothing. Status: healthy, degraded (slow) or down."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import select, update

from tierq.config import BackendConfig, TierqConfig
from tierq.db import db_now, session_scope
from tierq.models import Backend, Health
from worker.backends import client_for
from worker.backends.base import BackendError

log = logging.getLogger(__name__)
CANARY_SLOWNESS = 3  # a canary this many times slower than "degraded" counts as down
CANARY = {"messages": [{"role": "user", "content": "Reply with one word: ok"}], "max_tokens": 4}


@dataclass(frozen=True)
class ProbeResult:
    backend: str
    health: str
    latency_ms: float
    error: str | None


def probe(backend: BackendConfig) -> ProbeResult:
    """Probe one backend; blocks (it runs in a thread of the prober's pool, on an event
    loop of its own)."""
    return asyncio.run(_probe(backend))


async def _probe(backend: BackendConfig) -> ProbeResult:
    started = time.monotonic()
    try:
        async with client_for(canary_bounded(backend)) as client:
            await client.check_live()
            if backend.canary:
                answer = await client.chat(CANARY)
                if not answer.content.strip():
                    raise BackendError("malformed", "canary answer was empty")
    except BackendError as error:
        return ProbeResult(backend.name, Health.DOWN, _ms(started), str(error))
    latency = _ms(started)
    slow = latency > backend.health.degraded_latency_ms
    health = Health.DEGRADED if slow else Health.HEALTHY
    return ProbeResult(backend.name, health, latency, None)


def canary_timeout(backend: BackendConfig) -> float:
    """A canary of four tokens that takes this long has told us enough: the backend is down
    for our purposes. Long enough for a slow (degraded) answer, and never a model-sized
    read timeout that would hold a probe thread for a minute."""
    health = backend.health
    return min(
        backend.read_timeout,
        max(health.interval, CANARY_SLOWNESS * health.degraded_latency_ms / 1000),
    )


def canary_bounded(backend: BackendConfig) -> BackendConfig:
    return backend.model_copy(update={"read_timeout": canary_timeout(backend)})


def save(result: ProbeResult) -> None:
    values: dict[str, object] = {
        "health": result.health,
        "last_probe_at": db_now(),
        "last_error": result.error,
        "updated_at": db_now(),
    }
    with session_scope() as session:
        session.execute(update(Backend).where(Backend.name == result.backend).values(values))
    if result.health != Health.HEALTHY:
        log.warning(
            "probe %s: %s (%s)",
            result.backend,
            result.health,
            result.error or f"{result.latency_ms:.0f} ms",
        )


class Prober:
    """Probes each enabled backend on its own interval, several at once, while ``active``
    is set (the relay sets it while it leads). A backend whose probe hangs holds up only
    itself: it is probed again once that probe ends (its canary timeout bounds it)."""

    def __init__(self, config: TierqConfig) -> None:
        self.config = config
        self.active = threading.Event()
        self._next: dict[str, float] = {}
        self._in_flight: dict[str, Future[ProbeResult]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._thread: threading.Thread | None = None

    def due(self, disabled: Collection[str] = ()) -> list[BackendConfig]:
        now = time.monotonic()
        return [
            b
            for b in self.config.backends.values()
            if b.name not in disabled
            and b.name not in self._in_flight
            and self._next.get(b.name, 0) <= now
        ]

    def start(self) -> None:
        """Probe in a background thread for the life of the process; a second call (the
        relay elected again) starts nothing more."""
        if self._thread is not None:
            return

        def loop() -> None:
            while True:
                self.active.wait()
                try:
                    self.run_once()
                except Exception:  # a database outage must not end probing for good
                    log.exception("health probe round failed")
                time.sleep(0.5)

        self._thread = threading.Thread(target=loop, name="health-prober", daemon=True)
        self._thread.start()

    def run_once(self) -> list[Future[ProbeResult]]:
        """Start the probes that are due; each saves its own result when it ends."""
        self._forget_finished()
        started = []
        for backend in self.due(disabled_backends()):
            self._next[backend.name] = time.monotonic() + backend.health.interval
            future = self._pool.submit(probe_and_save, backend)
            self._in_flight[backend.name] = future
            started.append(future)
        return started

    def _forget_finished(self) -> None:
        for name, future in list(self._in_flight.items()):
            if future.done():
                del self._in_flight[name]


def disabled_backends() -> set[str]:
    """Operator-disabled backends get no call at all, probes included."""
    with session_scope() as session:
        return set(session.scalars(select(Backend.name).where(Backend.disabled.is_(True))))


def probe_and_save(backend: BackendConfig) -> ProbeResult:
    result = probe(backend)
    try:
        save(result)
    except Exception:  # the database is down: the next probe saves a fresher answer
        log.exception("saving the probe of %s failed", backend.name)
    return result


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
