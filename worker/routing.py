"""Choosing a backend inside a tier: skip what is disabled, down or open; spread the rest.

Among the live backends the choice is random, weighted by the inverse of their recent
latency and by the slow-start ramp of a breaker that just closed, so a recovered backend
gets a growing share of traffic instead of all of it at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.db import db_now
from tierq.models import Backend
from worker import circuit

LATENCY_FLOOR_MS = 50.0


@dataclass(frozen=True)
class Route:
    backend: BackendConfig
    permit: circuit.Permit


def _weight(row: Backend, now: datetime, slow_start: float) -> float:
    weight = 1.0 / (LATENCY_FLOOR_MS + (row.last_latency_ms or 0.0))
    if slow_start > 0 and row.closed_at is not None:
        ramp = (now - _aware(row.closed_at)).total_seconds() / slow_start
        weight *= min(max(ramp, 0.1), 1.0)
    return weight


def _ordered(
    candidates: list[tuple[BackendConfig, Backend]], now: datetime, config: TierqConfig
) -> list[tuple[BackendConfig, Backend]]:
    """Weighted random order without replacement (Efraimidis-Spirakis keys)."""

    def key(pair: tuple[BackendConfig, Backend]) -> float:
        weight = _weight(pair[1], now, config.breaker_for(pair[0].name).slow_start_seconds)
        return random.random() ** (1.0 / weight)

    return sorted(candidates, key=key, reverse=True)


def choose(
    session: Session, config: TierqConfig, tier: TierConfig, pinned: str | None = None
) -> Route | None:
    """A backend of ``tier`` that may be called now, with its breaker permit; None if none."""
    wanted = [b for b in tier.backends if pinned is None or b.name == pinned]
    rows_and_now = session.execute(
        select(Backend, db_now()).where(Backend.name.in_([b.name for b in wanted]))
    ).all()
    if len(rows_and_now) < len(wanted):
        circuit.ensure_rows(session, config)
        return choose(session, config, tier, pinned)
    rows = {row.name: row for row, _ in rows_and_now}
    now = _aware(rows_and_now[0][1]) if rows_and_now else None
    live = [
        (b, rows[b.name])
        for b in wanted
        if not rows[b.name].disabled and rows[b.name].health != "down"
    ]
    for backend, row in _ordered(live, now, config) if now else []:
        permit = circuit.acquire(
            session,
            row,
            config.breaker_for(backend.name),
            trial_seconds=backend.read_timeout + backend.connect_timeout,
        )
        if permit is not None:
            return Route(backend, permit)
    return None


def _aware(value: datetime | str) -> datetime:
    from datetime import UTC

    if isinstance(value, str):  # SQLite hands back db_now() as text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
