"""The relay: the one process that turns database state into broker messages.

Besides the API's fast path, nothing else publishes. Each sweep:
- running jobs whose lease expired go back to queued (or to dead, after too many deliveries);
- retry_wait jobs that are due, and parked jobs at the replay rate, go back to queued;
- queued jobs never published, or published long ago with nothing come of it, are published;
- a broker that came back empty (restart, flush) has every queued job published at once.
Only one relay is active: on Postgres it holds an advisory lock, on SQLite a file lock.
"""

from __future__ import annotations

import fcntl
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, exists, func, select, text, update
from sqlalchemy.orm import Session, aliased

from tierq import broker
from tierq.config import TierqConfig
from tierq.db import db_now, get_engine, session_scope
from tierq.events import notify_job_changed, record_event
from tierq.models import ACTIVE_STATUSES, Backend, Job, JobStatus
from tierq.operations import release_parked
from tierq.settings import Settings
from worker import circuit
from worker.broker_epoch import BrokerEpoch
from worker.health import Prober
from worker.webhook_delivery import publish_due_deliveries

log = logging.getLogger(__name__)
RELAY_LOCK_ID = 0x7469657271  # "tierq"
PUBLISH_BATCH = 1000


class Relay:
    def __init__(self, config: TierqConfig, settings: Settings) -> None:
        self.config, self.settings = config, settings
        self.epoch = BrokerEpoch(settings)
        self._replay_credit = 0.0
        self._last_sweep = time.monotonic()
        self._saw_outage = False

    def sweep(self) -> dict[str, int]:
        """One pass; returns how many jobs each step touched (for logs and tests)."""
        counts = {
            "expired": self._reclaim_expired(),
            "woken": self._wake_due(),
            "replayed": self._replay_parked(),
            "timed_out": self._fail_past_deadline(),
        }
        if self.epoch.lost():
            counts["broker_reset"] = self._forget_publications()
            log.warning("broker came back empty; re-publishing every queued job")
        counts["published"] = self._publish_pending()
        counts["webhooks"] = publish_due_deliveries()
        self.epoch.mark()
        return counts

    def _reclaim_expired(self) -> int:
        expired = (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < db_now())
        with session_scope() as session:
            dead = session.scalars(
                update(Job)
                .where(expired, Job.deliveries >= self.settings.max_deliveries)
                .values(
                    status=JobStatus.DEAD,
                    finished_at=db_now(),
                    updated_at=db_now(),
                    lease_token=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    error=f"poison job: delivered {self.settings.max_deliveries} times "
                    "without finishing",
                )
                .returning(Job.id)
            ).all()
            for job_id in dead:
                record_event(session, job_id, "dead", reason="poison job")
                notify_job_changed(session, job_id)
                log.error("job %s is dead: its worker died on every delivery", job_id)
            requeued = session.scalars(
                update(Job)
                .where(expired)
                .values(
                    status=JobStatus.QUEUED,
                    published_at=None,
                    updated_at=db_now(),
                    lease_token=None,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(Job.id)
            ).all()
            for job_id in requeued:
                record_event(session, job_id, "requeued", reason="lease expired")
        return len(dead) + len(requeued)

    def _wake_due(self) -> int:
        with session_scope() as session:
            return len(
                session.scalars(
                    update(Job)
                    .where(Job.status == JobStatus.RETRY_WAIT, Job.due_at <= db_now())
                    .values(
                        status=JobStatus.QUEUED, published_at=None, due_at=None, updated_at=db_now()
                    )
                    .returning(Job.id)
                ).all()
            )

    def _replay_parked(self) -> int:
        """Release parked jobs to the first tier that is alive again, highest priority and
        oldest first: one at a time while its breaker is only half open, then at the replay
        rate (a token bucket), so a recovering backend is not flooded."""
        now = time.monotonic()
        rate = self.config.emergency.replay_rate
        self._replay_credit = min(
            self._replay_credit + (now - self._last_sweep) * rate, max(rate, 1.0)
        )
        self._last_sweep = now
        with session_scope() as session:
            live = live_tier(session, self.config)
            if live is None:
                self._saw_outage = True
                self._push_back_retry_after(session)
                return 0
            tier, closed = live
            budget = int(self._replay_credit) if closed else self._trial_budget(session, tier)
            if budget <= 0:
                return 0
            ids = session.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.PARKED)
                .order_by(Job.priority.desc(), Job.created_at)
                .limit(budget)
            ).all()
            released = release_parked(session, list(ids), tier, by="relay")
        if closed:
            self._replay_credit -= len(released)
        return len(released)

    def _trial_budget(self, session: Session, tier: str) -> int:
        """While a breaker is half open, one replayed job at a time goes to it."""
        busy = session.scalar(
            select(func.count()).where(
                Job.tier == tier, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
            )
        )
        return 0 if busy else 1

    def _push_back_retry_after(self, session: Session) -> None:
        """Nothing is alive: keep the retry time that pollers see in the future."""
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.PARKED, Job.due_at <= db_now())
            .values(due_at=db_now(self.config.emergency.retry_after))
        )

    def _fail_past_deadline(self) -> int:
        waiting = (JobStatus.QUEUED, JobStatus.RETRY_WAIT, JobStatus.PARKED)
        with session_scope() as session:
            failed = session.scalars(
                update(Job)
                .where(Job.status.in_(waiting), Job.deadline < db_now())
                .values(
                    status=JobStatus.FAILED,
                    error="deadline passed before an answer",
                    finished_at=db_now(),
                    updated_at=db_now(),
                )
                .returning(Job.id)
            ).all()
            for job_id in failed:
                record_event(session, job_id, "failed", reason="deadline passed")
                notify_job_changed(session, job_id)
        return len(failed)

    def _forget_publications(self) -> int:
        with session_scope() as session:
            return len(
                session.scalars(
                    update(Job)
                    .where(Job.status == JobStatus.QUEUED)
                    .values(published_at=None)
                    .returning(Job.id)
                ).all()
            )

    def _publish_pending(self) -> int:
        before = aliased(Job)
        blocked = exists().where(before.id == Job.after_job_id, before.status.in_(ACTIVE_STATUSES))
        stale = Job.published_at < db_now(-self.settings.republish_after)
        with session_scope() as session:
            rows = session.execute(
                select(Job.id, Job.tier)
                .where(Job.status == JobStatus.QUEUED, Job.published_at.is_(None) | stale, ~blocked)
                .order_by(Job.priority.desc(), Job.created_at)
                .limit(PUBLISH_BATCH)
            ).all()
        published: list[uuid.UUID] = [
            row.id
            for row in rows
            if broker.publish(row.id, row.tier, retry_policy=broker.RELAY_RETRY)
        ]
        if published:
            with session_scope() as session:
                session.execute(
                    update(Job).where(Job.id.in_(published)).values(published_at=db_now())
                )
        return len(published)


@contextmanager
def leadership(engine: Engine, settings: Settings) -> Iterator[Any]:
    """Block until this process is the one active relay; hold it until the block ends."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            while not conn.scalar(text("SELECT pg_try_advisory_lock(:id)"), {"id": RELAY_LOCK_ID}):
                conn.rollback()
                time.sleep(1)
            conn.commit()
            yield conn
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "relay.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield handle


def live_tier(session: Session, config: TierqConfig) -> tuple[str, bool] | None:
    """The first model tier with a backend that may take calls, and whether one of its
    breakers is fully closed (False: only half-open trials, or open past recovery)."""
    rows = {row.name: row for row in session.scalars(select(Backend))}
    now = session.scalar(select(db_now()))
    for tier in config.tiers:
        states = [
            _callable_state(rows.get(b.name), config.breaker_for(b.name).recovery_timeout, now)
            for b in tier.backends
        ]
        if "closed" in states:
            return tier.name, True
        if "trial" in states:
            return tier.name, False
    return None


def _callable_state(row: Backend | None, recovery: float, now: Any) -> str | None:
    if row is None:
        return "closed"  # never seen: no reason to think it is down
    if row.disabled or row.health == "down":
        return None
    if row.circuit == "closed":
        return "closed"
    if row.circuit == "half_open":
        return "trial"
    opened = _as_datetime(row.opened_at)
    if opened is None or (_as_datetime(now) - opened).total_seconds() >= recovery:
        return "trial"
    return None


def _as_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite returns db_now() as text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run_forever(config: TierqConfig, settings: Settings, prober: Prober | None = None) -> None:
    relay = Relay(config, settings)
    engine = get_engine()
    log.info("relay waiting for leadership")
    while True:
        try:
            with leadership(engine, settings):
                log.info("relay active")
                with session_scope() as session:
                    circuit.ensure_rows(session, config)
                if prober is not None:
                    prober.start()
                while True:
                    counts = relay.sweep()
                    if any(counts.values()):
                        log.info("relay sweep: %s", counts)
                    time.sleep(settings.relay_interval)
        except Exception as exc:  # database or broker down: keep trying, lose nothing
            log.warning("relay sweep failed (%s: %s); retrying", type(exc).__name__, exc)
            time.sleep(settings.relay_interval)
