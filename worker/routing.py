"""Choosing a backend inside a tier: skip what is disabled, down, open or full; spread the rest.

A backend takes at most ``max_concurrency`` calls at once, counted across every worker
from the database (running jobs whose ``calling_backend`` names it, under a live lease).
Right after its breaker closes, the slow-start ramp lowers that cap (ramp * max_concurrency,
at least 1), so a just-recovered backend gets a growing share of traffic even when it is the
only one in its tier. Healthy backends come before degraded (slow) ones; among equals the
choice is random, weighted by the inverse of recent latency, the ramp and free slots.

Taking a slot is race-safe: on Postgres ``choose`` first takes a transaction-level advisory
lock per backend of the tier (in name order, so two workers never deadlock; only choosers take
them, so nothing else can wait on them), then counts, and the slot is a conditional UPDATE.
Two workers therefore cannot both take a backend's last slot. SQLite serializes writers, and
the conditional UPDATE is the guard there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from tierq import leases
from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.db import db_now
from tierq.features import Feature, missing
from tierq.models import Backend, Circuit, Health, Job
from worker import circuit

LATENCY_FLOOR_MS = 50.0
# Key space of the call-slot advisory locks (two-int form: apart from the relay's lock).
SLOT_LOCK_SPACE = 0x74716373  # "tqcs"
MIN_RAMP = 0.1
# Lower is preferred; "unknown" (not probed yet) is given the benefit of the doubt.
HEALTH_RANK = {Health.HEALTHY: 0, Health.UNKNOWN: 0, Health.DEGRADED: 1}


@dataclass(frozen=True)
class Route:
    backend: BackendConfig
    permit: circuit.Permit


@dataclass(frozen=True)
class Full:
    """Every backend of the tier that would take a call is at its concurrency cap: the tier
    is busy, not dead."""

    backends: tuple[str, ...]


@dataclass(frozen=True)
class _Candidate:
    config: BackendConfig
    row: Backend
    ramp: float
    in_flight: int

    @property
    def cap(self) -> int:
        return effective_cap(self.config, self.ramp)

    @property
    def has_slot(self) -> bool:
        return self.in_flight < self.cap


def ramp(row: Backend, now: datetime, slow_start: float) -> float:
    """Share of full traffic a backend takes, growing from MIN_RAMP to 1 over
    ``slow_start`` seconds after its breaker closed."""
    if slow_start <= 0 or row.closed_at is None:
        return 1.0
    elapsed = (now - row.closed_at).total_seconds()
    return min(max(elapsed / slow_start, MIN_RAMP), 1.0)


def effective_cap(backend: BackendConfig, ramp_share: float) -> int:
    return max(1, math.floor(ramp_share * backend.max_concurrency))


def _weight(candidate: _Candidate) -> float:
    latency = 1.0 / (LATENCY_FLOOR_MS + (candidate.row.last_latency_ms or 0.0))
    free = (candidate.cap - candidate.in_flight) / candidate.cap
    return latency * candidate.ramp * free


def _ordered(candidates: list[_Candidate]) -> list[_Candidate]:
    """Healthy first; within a health, weighted random order without replacement
    (Efraimidis-Spirakis keys)."""

    def key(candidate: _Candidate) -> tuple[int, float]:
        rank = HEALTH_RANK.get(candidate.row.health, 0)
        return rank, -(random.random() ** (1.0 / _weight(candidate)))

    return sorted(candidates, key=key)


def _lock_slots(session: Session, backends: list[BackendConfig]) -> None:
    """Until the caller commits, no other worker counts or takes these backends' slots."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for name in sorted(b.name for b in backends):  # one statement each: the order is ours
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))"),
            {"space": SLOT_LOCK_SPACE, "name": name},
        )


# Built once: each backend's row, the database's time and the backend's calls in flight,
# in one read (without the slot locks: it orders the candidates, start_call decides).
_in_flight_here = (
    select(func.count())
    .where(leases.in_flight(Job), Job.calling_backend == Backend.name)
    .correlate(Backend)
    .scalar_subquery()
)
_ROWS = select(Backend, db_now(), _in_flight_here).where(
    Backend.name.in_(bindparam("p_names", expanding=True))
)


def _rows(
    session: Session, config: TierqConfig, wanted: list[BackendConfig]
) -> tuple[dict[str, tuple[Backend, int]], datetime | None]:
    """The backends' rows with their calls in flight, and the database's time."""
    found = session.execute(_ROWS, {"p_names": [b.name for b in wanted]}).all()
    if len(found) < len(wanted):
        circuit.ensure_rows(session, config)
        return _rows(session, config, wanted)
    rows = {row.name: (row, in_flight) for row, _, in_flight in found}
    now = found[0][1] if found else None
    return rows, now


def _candidates(
    session: Session, config: TierqConfig, wanted: list[BackendConfig]
) -> list[_Candidate]:
    rows, now = _rows(session, config, wanted)
    if now is None:
        return []
    return [
        _Candidate(b, row, ramp(row, now, config.breaker_for(b.name).slow_start_seconds), in_flight)
        for b in wanted
        for row, in_flight in [rows[b.name]]
        if not row.disabled and row.health != Health.DOWN
    ]


def choose(
    session: Session,
    config: TierqConfig,
    tier: TierConfig,
    lease: leases.Lease,
    pinned: str | None = None,
    lease_seconds: float = 30.0,
    needs: Collection[Feature] = (),
) -> Route | Full | None:
    """A backend of ``tier`` to call now, with its breaker permit and a call slot taken for
    ``lease``'s job (give it back with ``leases.end_call``). Full: every backend that would
    take a call is at its cap. None: nothing in the tier is alive. The lease runs
    ``lease_seconds`` from the moment the slot is taken (waiting for the locks is not
    the call's time). Only backends that can do what the request ``needs`` are considered.

    The rows and counts are read without a lock (they order the candidates); the slot locks
    are taken only then, and the caller commits right after: every worker's claim of this
    tier waits on them, so they are held for as few statements as possible."""
    wanted = [
        b
        for b in tier.backends
        if (pinned is None or b.name == pinned) and not missing(needs, b.lacks)
    ]
    candidates = _candidates(session, config, wanted)
    full = [c.config.name for c in candidates if not c.has_slot and c.row.circuit == Circuit.CLOSED]
    ordered = _ordered([c for c in candidates if c.has_slot])
    locked = False
    for candidate in ordered:
        backend = candidate.config
        breaker = config.breaker_for(backend.name)
        trial_seconds = backend.read_timeout + backend.connect_timeout
        permit = circuit.acquire(session, candidate.row, breaker, trial_seconds=trial_seconds)
        if permit is None:
            continue
        if not locked:
            _lock_slots(session, [c.config for c in ordered])
            locked = True
        # The count in this UPDATE is read after the locks: it sees every slot taken before.
        if leases.start_call(session, lease, backend.name, candidate.cap, lease_seconds):
            return Route(backend, permit)
        full.append(backend.name)
        circuit.release_trial(session, permit)
    return Full(tuple(full)) if full else None
