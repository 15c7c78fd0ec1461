"""The database side of health probes: a backend's shared state as a probe starts (or
ends), and the probe's verdict saved on the backend's row."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import func, select, update

from tierq import leases
from tierq.db import db_now, session_scope
from tierq.models import Backend, Health, Job
from worker.probe_policy import BackendState, ProbeResult

log = logging.getLogger("worker.health")


def save(result: ProbeResult) -> None:
    values: dict[str, object] = {
        "last_probe_at": db_now(),
        "last_error": result.error,
        "updated_at": db_now(),
    }
    if result.health is not None:
        values["health"] = result.health
    if result.listed:  # a probe that never got the list knows nothing new of the models
        values["served_models"] = result.served_models
        values["model_error"] = result.model_error
    with session_scope() as session:
        session.execute(update(Backend).where(Backend.name == result.backend).values(values))
    if result.health not in (Health.HEALTHY, None) or result.error:
        log.warning(
            "probe %s: %s (%s)",
            result.backend,
            result.health or "unchanged",
            result.error or f"{result.latency_ms:.0f} ms",
        )
    if result.model_error:
        log.warning("probe %s: %s", result.backend, result.model_error)


# One backend's shared state, its calls in flight and the database's time, in one read.
_in_flight_here = (
    select(func.count())
    .where(leases.in_flight(Job), Job.calling_backend == Backend.name)
    .correlate(Backend)
    .scalar_subquery()
)
_STATE = select(
    Backend.health,
    Backend.circuit,
    Backend.last_answer_at,
    Backend.window_started_at,
    Backend.window_failures,
    db_now(),
    _in_flight_here,
)


def read_state(name: str, window_seconds: float) -> BackendState:
    with session_scope() as session:
        row = session.execute(_STATE.where(Backend.name == name)).one_or_none()
    if row is None:
        return BackendState()  # no worker has touched it yet: idle, never answered
    health, circuit, answered_at, window_at, failures, now, in_flight = row
    return BackendState(
        in_flight=in_flight,
        answered_ago=_seconds_since(answered_at, now),
        health=health,
        circuit=circuit,
        recent_failures=failures if _within(window_at, now, window_seconds) else 0,
    )


def _seconds_since(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else (now - then).total_seconds()


def _within(then: datetime | None, now: datetime, seconds: float) -> bool:
    since = _seconds_since(then, now)
    return since is not None and since < seconds
