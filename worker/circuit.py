"""Circuit breakers shared by every worker process and machine: one row per backend.

CLOSED → OPEN when failures / calls ≥ failure_rate over at least min_calls in the window;
OPEN → HALF_OPEN after recovery_timeout, letting one trial call through at a time;
HALF_OPEN → CLOSED after half_open_successes trial successes (then a slow-start ramp);
HALF_OPEN → OPEN on a trial failure. Every transition is one conditional UPDATE, so two
workers racing for the same transition produce it once, and it is recorded with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Float, Integer, bindparam, case, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from tierq.config import BreakerConfig, TierqConfig
from tierq.db import db_now
from tierq.models import Backend, Circuit, CircuitTransition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Permit:
    backend: str
    trial: bool  # a half-open trial: its outcome decides the breaker


def ensure_rows(session: Session, config: TierqConfig) -> None:
    """A row per configured backend (new backends start closed and healthy-unknown).
    Workers may race to create the same row: the second insert does nothing."""
    known = set(session.scalars(select(Backend.name)))
    missing = [
        {"name": backend.name, "tier": tier.name}
        for tier in config.tiers
        for backend in tier.backends
        if backend.name not in known
    ]
    if not missing:
        return
    dialect = session.get_bind().dialect.name
    insert_ = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert_(Backend).values(missing).on_conflict_do_nothing())


def _transition(session: Session, backend: str, old: Circuit, new: Circuit, reason: str) -> None:
    session.execute(
        insert(CircuitTransition).values(
            backend=backend, from_state=old, to_state=new, reason=reason
        )
    )
    log.warning("breaker %s: %s → %s (%s)", backend, old, new, reason)


def acquire(
    session: Session, row: Backend, breaker: BreakerConfig, trial_seconds: float
) -> Permit | None:
    """May a call go to this backend now? None: skip it at once."""
    if row.disabled:
        return None
    if row.circuit == Circuit.CLOSED:
        return Permit(row.name, trial=False)
    if row.circuit == Circuit.OPEN and _half_open(
        session, row.name, breaker, trial_until=db_now(trial_seconds)
    ):
        return Permit(row.name, trial=True)
        # Still open, or the relay half-opened it since ``row`` was read: the UPDATE below
        # matches only a half-open breaker.
    trial = session.scalar(  # half-open: one trial call at a time
        update(Backend)
        .where(
            Backend.name == row.name,
            Backend.circuit == Circuit.HALF_OPEN,
            (Backend.trial_until.is_(None)) | (Backend.trial_until < db_now()),
        )
        .values(trial_until=db_now(trial_seconds))
        .returning(Backend.name)
    )
    return Permit(row.name, trial=True) if trial else None


# Built once (the hot path: every call's outcome), on the table, with bound parameters.
_backends = Backend.__table__
_fresh_window = _backends.c.window_started_at.is_(None) | (
    _backends.c.window_started_at < db_now(bindparam("p_window_start", type_=Float()))
)
_failed = bindparam("p_failed", type_=Integer())
_answered = bindparam("p_answered", type_=Boolean())
_RECORD_CALL = (
    update(_backends)
    .where(_backends.c.name == bindparam("p_backend", type_=_backends.c.name.type))
    .values(
        window_started_at=case((_fresh_window, db_now()), else_=_backends.c.window_started_at),
        window_calls=case((_fresh_window, 1), else_=_backends.c.window_calls + 1),
        window_failures=case((_fresh_window, _failed), else_=_backends.c.window_failures + _failed),
        window_retries=case((_fresh_window, 0), else_=_backends.c.window_retries),
        # A failed call's latency says nothing: the last good one stays (a rejected
        # request, counted as healthy, has no latency either).
        last_latency_ms=case(
            (_answered, bindparam("p_latency", type_=_backends.c.last_latency_ms.type)),
            else_=_backends.c.last_latency_ms,
        ),
        # Database clock: the prober compares it with its own reading of that clock.
        last_answer_at=case((_answered, db_now()), else_=_backends.c.last_answer_at),
    )
    .returning(_backends.c.window_calls, _backends.c.window_failures)
)


def record(
    session: Session,
    permit: Permit,
    ok: bool,
    breaker: BreakerConfig,
    reason: str = "",
    latency_ms: float | None = None,
) -> None:
    """Count a call's outcome and make whatever transition it causes. A call given a
    ``latency_ms`` was answered: the backend's ``last_answer_at`` is stamped, and the health
    prober sends it no canary while it keeps answering."""
    answered = ok and latency_ms is not None
    if permit.trial:
        if answered:
            stamp_answer(session, permit.backend)
        _record_trial(session, permit.backend, ok, breaker, reason)
        return
    calls, failures = session.execute(
        _RECORD_CALL,
        {
            "p_backend": permit.backend,
            "p_window_start": -breaker.window_seconds,
            "p_failed": 0 if ok else 1,
            "p_answered": answered,
            "p_latency": latency_ms,
        },
    ).one()
    if not ok and calls >= breaker.min_calls and failures / calls >= breaker.failure_rate:
        _open(
            session,
            permit.backend,
            Circuit.CLOSED,
            f"{failures}/{calls} calls failed in {breaker.window_seconds:g}s; last: {reason}",
        )


def stamp_answer(session: Session, backend: str) -> None:
    session.execute(update(Backend).where(Backend.name == backend).values(last_answer_at=db_now()))


def _open(session: Session, backend: str, old: Circuit, reason: str) -> None:
    opened = session.scalar(
        update(Backend)
        .where(Backend.name == backend, Backend.circuit == old)
        .values(circuit=Circuit.OPEN, opened_at=db_now(), trial_until=None, updated_at=db_now())
        .returning(Backend.name)
    )
    if opened:
        _transition(session, backend, old, Circuit.OPEN, reason)


def _record_trial(
    session: Session, backend: str, ok: bool, breaker: BreakerConfig, reason: str
) -> None:
    if not ok:
        _open(session, backend, Circuit.HALF_OPEN, f"trial call failed: {reason}")
        return
    successes = session.scalar(
        update(Backend)
        .where(Backend.name == backend, Backend.circuit == Circuit.HALF_OPEN)
        .values(trial_successes=Backend.trial_successes + 1, trial_until=None)
        .returning(Backend.trial_successes)
    )
    if successes is not None and successes >= breaker.half_open_successes:
        closed = session.scalar(
            update(Backend)
            .where(Backend.name == backend, Backend.circuit == Circuit.HALF_OPEN)
            .values(
                circuit=Circuit.CLOSED,
                closed_at=db_now(),
                window_started_at=None,
                window_calls=0,
                window_failures=0,
                window_retries=0,
                updated_at=db_now(),
            )
            .returning(Backend.name)
        )
        if closed:
            _transition(
                session,
                backend,
                Circuit.HALF_OPEN,
                Circuit.CLOSED,
                f"{successes} trial calls succeeded",
            )


def release_trial(session: Session, permit: Permit) -> None:
    """A half-open trial call that was stopped (cancelled, retired, the worker stopping)
    says nothing about the backend: its trial slot is free for the next call at once,
    counted neither as a success nor as a failure."""
    if permit.trial:
        session.execute(
            update(Backend)
            .where(Backend.name == permit.backend, Backend.circuit == Circuit.HALF_OPEN)
            .values(trial_until=None)
        )


def count_retry(session: Session, backend: str) -> None:
    session.execute(
        update(Backend)
        .where(Backend.name == backend)
        .values(window_retries=Backend.window_retries + 1)
    )


def retry_allowed(row: Backend, budget: float, min_calls: int = BreakerConfig().min_calls) -> bool:
    """Retries stay under ``budget`` of the backend's calls in the current window; below
    the breaker's ``min_calls`` the window says too little to refuse one."""
    calls = max(row.window_calls, 1)
    return (row.window_retries + 1) / calls <= budget or row.window_calls < min_calls


def half_open_due(session: Session, config: TierqConfig) -> int:
    """OPEN → HALF_OPEN for every breaker whose recovery timeout has passed, without
    waiting for a call to arrive (with only parked jobs, none would): the next call, a
    replayed job's, is the trial."""
    return sum(
        _half_open(session, name, config.breaker_for(name), trial_until=None)
        for name in config.backends
    )


def _half_open(session: Session, backend: str, breaker: BreakerConfig, trial_until: Any) -> bool:
    """OPEN → HALF_OPEN if the recovery timeout has passed; ``trial_until`` is set when the
    caller takes the first trial itself."""
    half_opened = session.scalar(
        update(Backend)
        .where(
            Backend.name == backend,
            Backend.circuit == Circuit.OPEN,
            Backend.opened_at <= db_now(-breaker.recovery_timeout),
        )
        .values(
            circuit=Circuit.HALF_OPEN,
            trial_successes=0,
            trial_until=trial_until,
            updated_at=db_now(),
        )
        .returning(Backend.name)
    )
    if half_opened:
        _transition(
            session,
            backend,
            Circuit.OPEN,
            Circuit.HALF_OPEN,
            f"recovery timeout of {breaker.recovery_timeout:g}s passed",
        )
    return half_opened is not None
