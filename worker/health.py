"""Health probes: the protocol's cheap liveness endpoint, and a tiny real inference (the
canary) where probes cost nothing. Status: healthy, degraded (slow) or down."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import update

from tierq.config import BackendConfig, TierqConfig
from tierq.db import db_now, session_scope
from tierq.models import Backend
from worker.backends import client_for
from worker.backends.base import BackendError

log = logging.getLogger(__name__)
CANARY = {"messages": [{"role": "user", "content": "Reply with one word: ok"}], "max_tokens": 4}


@dataclass(frozen=True)
class ProbeResult:
    backend: str
    health: str
    latency_ms: float
    error: str | None


def probe(backend: BackendConfig) -> ProbeResult:
    started = time.monotonic()
    try:
        with client_for(backend) as client:
            client.check_live()
            if backend.canary:
                answer = client.chat(CANARY)
                if not answer.content.strip():
                    raise BackendError("malformed", "canary answer was empty")
    except BackendError as error:
        return ProbeResult(backend.name, "down", _ms(started), str(error))
    latency = _ms(started)
    slow = latency > backend.health.degraded_latency_ms
    return ProbeResult(backend.name, "degraded" if slow else "healthy", latency, None)


def save(result: ProbeResult) -> None:
    values: dict[str, object] = {
        "health": result.health,
        "last_probe_at": db_now(),
        "last_error": result.error,
        "updated_at": db_now(),
    }
    with session_scope() as session:
        session.execute(update(Backend).where(Backend.name == result.backend).values(values))
    if result.health != "healthy":
        log.warning(
            "probe %s: %s (%s)",
            result.backend,
            result.health,
            result.error or f"{result.latency_ms:.0f} ms",
        )


class Prober:
    """Probes each backend on its own interval, several at once, never piling up."""

    def __init__(self, config: TierqConfig) -> None:
        self.config = config
        self._next: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")

    def due(self) -> list[BackendConfig]:
        now = time.monotonic()
        return [b for b in self.config.backends.values() if self._next.get(b.name, 0) <= now]

    def start(self) -> None:
        """Probe in a background thread for the life of the process."""
        import threading

        def loop() -> None:
            while True:
                try:
                    self.run_once()
                except Exception:  # a database outage must not end probing for good
                    log.exception("health probe round failed")
                time.sleep(0.5)

        threading.Thread(target=loop, name="health-prober", daemon=True).start()

    def run_once(self) -> list[ProbeResult]:
        backends = self.due()
        for backend in backends:
            self._next[backend.name] = time.monotonic() + backend.health.interval
        results = list(self._pool.map(probe, backends))
        for result in results:
            save(result)
        return results


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
