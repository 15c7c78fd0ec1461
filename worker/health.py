"""Health probes: what to send is decided by ``worker.probe_policy`` from the backend's
shared state (calls in flight, its last answered call, breaker, last probe); this module
reads that state, sends the model list (the protocol's cheap liveness endpoint, which also
says which models the server serves) and, where the policy allows, a tiny real inference
(the canary), and records the verdict: healthy, degraded (slow), down, or unchanged."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from sqlalchemy import select

from tierq.config import BackendConfig, BreakerConfig, TierqConfig
from tierq.db import session_scope
from tierq.models import Backend
from worker.backends import BackendClient, client_for
from worker.backends.base import BackendError
from worker.probe_policy import (
    BackendState,
    ProbePlan,
    ProbeResult,
    Send,
    busy_during,
    probe_plan,
    verdict,
)
from worker.probe_store import read_state, save
from worker.served_models import model_error, models_path, parse_model_list

log = logging.getLogger(__name__)
CANARY_SLOWNESS = 3  # a canary this many times slower than "degraded" counts as down
CANARY = {"messages": [{"role": "user", "content": "Reply with one word: ok"}], "max_tokens": 4}


@dataclass(frozen=True)
class Observation:
    """What a probe saw, before anyone judged it."""

    latency_ms: float
    failure: BackendError | None
    listed: bool  # the model list answered 2xx (parsed or not)
    served: list[str] | None  # its models; None when the answer was not a model list


def probe(backend: BackendConfig, state: BackendState | None = None) -> ProbeResult:
    """Probe one backend whose shared state is ``state`` (default: idle, never answered);
    blocks (it runs in a thread of the prober's pool, on an event loop of its own)."""
    state = state or BackendState()
    plan = probe_plan(backend, state)
    if plan.send is Send.NOTHING:
        return ProbeResult(backend.name, None, 0.0, None, Send.NOTHING)
    return judge(backend, plan, state.health, observe(backend, plan), state.in_flight)


def observe(backend: BackendConfig, plan: ProbePlan) -> Observation:
    return asyncio.run(_observe(backend, plan))


async def _observe(backend: BackendConfig, plan: ProbePlan) -> Observation:
    started = time.monotonic()
    listed, served = False, None
    try:
        async with httpx.AsyncClient() as http:
            client = client_for(canary_bounded(backend), http)
            served = await read_models(client, http)
            listed = True
            if plan.send is Send.CANARY:
                answer = await client.chat(CANARY)
                if not (answer.content or "").strip():
                    raise BackendError("malformed", "canary answer was empty")
    except BackendError as error:
        return Observation(_ms(started), error, listed, served)
    return Observation(_ms(started), None, listed, served)


async def read_models(client: BackendClient, http: httpx.AsyncClient) -> list[str] | None:
    """The server's model list: its liveness answer (raises BackendError like any call),
    and the models it serves, or None when the answer is not a model list."""
    protocol, timeout = client.config.protocol, client.liveness_timeout
    with client.translate_errors(timeout):
        url = client.url(models_path(protocol))
        response = await http.get(url, headers=client.headers(), timeout=timeout)
    if not response.is_success:
        client.raise_for_answer(response.status_code, response.headers, response.content)
    try:
        body = response.json()
    except ValueError:
        return None  # up, but says nothing we can read about its models
    return parse_model_list(protocol, body)


def judge(
    backend: BackendConfig, plan: ProbePlan, previous: str, seen: Observation, busy: int
) -> ProbeResult:
    failure = None if seen.failure is None else (seen.failure.error_class, str(seen.failure))
    found = verdict(backend, plan, previous, seen.latency_ms, failure, busy)
    mismatch = model_error(backend.protocol, backend.model, seen.served) if seen.listed else None
    return ProbeResult(
        backend.name,
        found.health,
        seen.latency_ms,
        found.error,
        plan.send,
        seen.listed,
        seen.served,
        mismatch,
    )


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


class Prober:
    """Probes each enabled backend on its own interval, several at once, while ``active``
    is set (the relay sets it while it leads). A backend whose probe hangs holds up only
    itself: it is probed again once that probe ends (its canary timeout bounds it)."""

    def __init__(self, config: TierqConfig) -> None:
        self.config = config
        self.active = threading.Event()
        self._next: dict[str, float] = {}
        self._in_flight: dict[str, Future[ProbeResult | None]] = {}
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

    def run_once(self) -> list[Future[ProbeResult | None]]:
        """Start the probes that are due; each saves its own result when it ends."""
        self._forget_finished()
        started = []
        for backend in self.due(disabled_backends()):
            self._next[backend.name] = time.monotonic() + backend.health.interval
            breaker = self.config.breaker_for(backend.name)
            future = self._pool.submit(probe_and_save, backend, breaker)
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


def probe_and_save(
    backend: BackendConfig, breaker: BreakerConfig | None = None
) -> ProbeResult | None:
    """Read the backend's state, probe it as the policy says, save the verdict. None when
    the database is away: nothing could be saved, so nothing is sent."""
    window = (breaker or backend.breaker or BreakerConfig()).window_seconds
    try:
        before = read_state(backend.name, window)
    except Exception:
        log.exception("reading the state of %s failed", backend.name)
        return None
    plan = probe_plan(backend, before)
    log.debug("probe %s: %s (%s)", backend.name, plan.send, plan.reason)
    if plan.send is Send.NOTHING:
        return ProbeResult(backend.name, None, 0.0, None, Send.NOTHING)
    seen = observe(backend, plan)
    busy = before.in_flight
    if seen.failure is not None:  # was it queued behind calls that started meanwhile?
        try:
            busy = busy_during(before, read_state(backend.name, window), seen.latency_ms / 1000)
        except Exception:
            log.exception("reading the state of %s failed", backend.name)
    result = judge(backend, plan, before.health, seen, busy)
    try:
        save(result)
    except Exception:  # the database is down: the next probe saves a fresher answer
        log.exception("saving the probe of %s failed", backend.name)
    return result


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
