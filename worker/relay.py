"""The relay: the one process that turns database state into broker messages.

Besides the API's fast path, nothing else publishes. Each sweep:
- running jobs whose lease expired go back to queued (or to dead, once their workers died
  with them too often: a poison job);
- retry_wait jobs that are due go back to queued; waiting jobs past their deadline fail;
- parked jobs go back to queued at the replay rate;
- queued jobs never published are published; of those published long ago, as many as the
  broker's queue is short of are published again;
- a broker that came back empty (restart, flush) has every queued job published at once.
Only one relay is active: on Postgres it holds an advisory lock (checked before every step),
on SQLite a file lock.
"""

from __future__ import annotations

import fcntl
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, exists, func, select, text, update
from sqlalchemy.orm import Session, aliased

from tierq import broker, routes, transitions
from tierq.config import TierqConfig
from tierq.db import db_now, get_engine, session_scope
from tierq.models import ACTIVE_STATUSES, Backend, Circuit, Health, Job, JobStatus
from tierq.settings import Settings
from worker import circuit, outbox
from worker.broker_epoch import BrokerEpoch
from worker.health import Prober
from worker.webhook_delivery import publish_due_deliveries

log = logging.getLogger(__name__)
RELAY_LOCK_ID = 0x7469657271  # "tierq"
SWEEP_JITTER = 0.2  # ± this share of relay_interval between sweeps


class LeadershipLost(RuntimeError):
    """The advisory lock is gone (its connection dropped): another relay may be active."""


@dataclass(frozen=True)
class LiveTier:
    name: str
    closed: bool  # False: only half-open trials (or open past its recovery timeout)


def _blocked() -> Any:
    """The job waits for the previous turn's job, which has not ended."""
    before = aliased(Job)
    return exists().where(before.id == Job.after_job_id, before.status.in_(ACTIVE_STATUSES))


class Relay:
    def __init__(self, config: TierqConfig, settings: Settings) -> None:
        self.config, self.settings = config, settings
        self.epoch = BrokerEpoch(settings)
        self._replay_credit = 0.0
        self._last_sweep = time.monotonic()
        self._saw_outage = False
        self.jobs = outbox.Outbox(
            table=Job,
            task=broker.RUN_JOB,
            kind="job",
            waiting=lambda: (Job.status == JobStatus.QUEUED) & ~_blocked(),
            order=lambda: [Job.priority.desc(), Job.created_at],
            republish_after=lambda: settings.republish_after,
            queue_column=lambda: Job.tier,
        )

    def sweep(self, still_leader: Callable[[], None] = lambda: None) -> dict[str, int]:
        """One pass; returns how many jobs each step touched (for logs and tests).

        ``still_leader`` raises LeadershipLost; it runs before every step, so a relay that
        lost its lock stops within one step, not one sweep."""
        counts: dict[str, int] = {}
        steps: list[tuple[str, Callable[[], int]]] = [
            ("expired", self._reclaim_expired),
            ("woken", self._wake_due),
            # Before replay: an expired parked job must fail, not spend a replay token.
            ("timed_out", self._fail_past_deadline),
            ("half_opened", self._half_open_due),
            ("replayed", self._replay_parked),
            ("broker_reset", self._republish_if_broker_lost),
            ("published", self._publish_pending),
            ("webhooks", publish_due_deliveries),
        ]
        for name, step in steps:
            still_leader()
            counts[name] = step()
        return counts

    def _reclaim_expired(self) -> int:
        """A lease that ran out means its worker died (or stalled past it): counted on the
        job, whose worker dying every time makes it a poison job. Claims themselves
        (retries, escalations, replays) do not count."""
        with session_scope() as session:
            dead, requeued = transitions.requeue_expired(
                session, self.settings.max_deliveries, stagger=self.settings.lease_seconds / 3
            )
        for job_id in dead:
            log.error("job %s is dead: its worker died on every delivery", job_id)
        return len(dead) + len(requeued)

    def _wake_due(self) -> int:
        with session_scope() as session:
            return transitions.wake_due(session)

    def _half_open_due(self) -> int:
        """Open breakers past their recovery timeout become half open here, not only when a
        call arrives: with nothing but parked jobs there is no call, and a parked job is what
        should be the trial."""
        with session_scope() as session:
            return circuit.half_open_due(session, self.config)

    def _replay_parked(self) -> int:
        """Release parked jobs, route by route, to the first step of their route that is
        alive again, highest priority and oldest first: one at a time while its breaker is
        only half open, then at the replay rate (shared by the routes), so a recovering
        backend is not flooded."""
        chains = routes.listed(self.config)
        with session_scope() as session:
            lives = [live_tier(session, self.config, chain.tier_names) for chain in chains]
            self._refill_replay_credit(next((live for live in lives if live), None))
            released = 0
            for chain, live in zip(chains, lives, strict=True):
                if live is None:
                    self._saw_outage = True
                    self._push_back_retry_after(session, self._of_route(chain))
                    continue
                budget = (
                    int(self._replay_credit) if live.closed else self._trial_budget(session, live)
                )
                if budget <= 0:
                    continue
                ids = session.scalars(
                    select(Job.id)
                    .where(
                        Job.status == JobStatus.PARKED,
                        self._of_route(chain),
                        Job.deadline.is_(None) | (Job.deadline >= db_now()),
                    )
                    .order_by(Job.priority.desc(), Job.created_at)
                    .limit(budget)
                ).all()
                done = transitions.release_parked(session, list(ids), live.name, by="relay")
                if live.closed:
                    self._replay_credit -= len(done)
                released += len(done)
        return released

    def _of_route(self, chain: routes.Chain) -> Any:
        """The jobs of this route; the first route also has those of no route it knows
        (from before routes, or of a route since removed: ``routes.of_job``)."""
        listed = routes.listed(self.config)
        if chain is not listed[0]:
            return Job.route == chain.model
        known = [c.model for c in listed[1:]]
        return Job.route.is_(None) | Job.route.not_in(known)

    def _refill_replay_credit(self, live: LiveTier | None) -> None:
        """A token bucket refilled at the replay rate and as deep as the time since the last
        sweep (which includes that sweep's own work), at most a second's worth: so the rate
        is reached however long a sweep takes, and a relay that stalled does not release a
        flood at once. The bucket is not sized by the backends' concurrency: capped at it,
        the replay drained at capacity / relay_interval (27 jobs/s against a configured
        500), and the backends are protected by their concurrency caps anyway."""
        now = time.monotonic()
        rate = self.config.emergency.replay_rate
        elapsed = now - self._last_sweep
        period = min(max(elapsed, self.settings.relay_interval), 1.0)
        burst = max(1.0, rate * period) if live else 1.0
        self._replay_credit = min(self._replay_credit + elapsed * rate, burst)
        self._last_sweep = now

    def _trial_budget(self, session: Session, live: LiveTier) -> int:
        """While a breaker is half open, one replayed job at a time goes to it. Jobs queued
        behind a parked predecessor do not count: they wait for it, it must not wait for
        them."""
        busy = session.scalar(
            select(func.count()).where(
                Job.tier == live.name,
                (Job.status == JobStatus.RUNNING)
                | ((Job.status == JobStatus.QUEUED) & ~_blocked()),
            )
        )
        return 0 if busy else 1

    def _push_back_retry_after(self, session: Session, of_route: Any) -> None:
        """Nothing of a route is alive: keep the retry time its pollers see in the future."""
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.PARKED, of_route, Job.due_at <= db_now())
            .values(due_at=db_now(self.config.emergency.retry_after))
        )

    def _fail_past_deadline(self) -> int:
        with session_scope() as session:
            return transitions.fail_past_deadline(session)

    def _republish_if_broker_lost(self) -> int:
        if not self.epoch.lost():
            return 0
        # Marked before publishing: a flush during the publishes below removes the new
        # marker too, and the next sweep notices it.
        self.epoch.mark()
        log.warning("broker came back empty; re-publishing every queued job")
        return self._forget_publications()

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
        return outbox.publish_pending(self.jobs, self.settings)


class Leadership:
    """This process is the one active relay while it holds the advisory lock on ``conn``.

    The lock belongs to the connection's Postgres session: if the connection drops
    (Postgres restarted, backend terminated), the lock is released and a standby takes it.
    ``check`` asks Postgres whether our session still holds it, before every sweep step."""

    def __init__(self, conn: Connection | None) -> None:
        self._conn = conn

    def check(self) -> None:
        if self._conn is None:
            return  # SQLite: a file lock held by an open file cannot be lost
        try:
            held = self._conn.scalar(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND granted AND objsubid = 1"
                    " AND ((classid::bigint << 32) | objid::bigint) = :id)"
                ),
                {"id": RELAY_LOCK_ID},
            )
            self._conn.rollback()
        except Exception as exc:
            raise LeadershipLost(f"the lock's connection failed: {exc}") from exc
        if not held:
            raise LeadershipLost("the advisory lock is no longer held")


@contextmanager
def leadership(
    engine: Engine, settings: Settings, stop: threading.Event | None = None
) -> Iterator[Leadership]:
    """Block until this process is the one active relay; hold it until the block ends."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            waiting = stop or threading.Event()
            while not conn.scalar(text("SELECT pg_try_advisory_lock(:id)"), {"id": RELAY_LOCK_ID}):
                conn.rollback()
                if waiting.wait(1):
                    raise LeadershipLost("stopped before becoming the leader")
            conn.commit()
            try:
                yield Leadership(conn)
            finally:
                _unlock(conn)
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "relay.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield Leadership(None)


def _unlock(conn: Connection) -> None:
    """Leaving on purpose: let a standby take over now, not when the connection closes
    (a pooled connection is not closed, and would keep the lock)."""
    try:
        conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock_all()"))
        conn.commit()
    except Exception:
        conn.invalidate()  # a broken connection: drop it, and the lock with it


def live_tier(
    session: Session, config: TierqConfig, tiers: list[str] | None = None
) -> LiveTier | None:
    """The first model tier (of ``tiers``, in their order; default all) with a backend that
    may take calls, and whether one of its breakers is fully closed."""
    rows = {row.name: row for row in session.scalars(select(Backend))}
    now = session.scalar(select(db_now()))
    for tier in [config.tier(name) for name in tiers or config.tier_names]:
        states = {
            b.name: _callable_state(
                rows.get(b.name), config.breaker_for(b.name).recovery_timeout, now
            )
            for b in tier.backends
        }
        if "closed" in states.values():
            return LiveTier(tier.name, True)
        if "trial" in states.values():
            return LiveTier(tier.name, False)
    return None


def _callable_state(row: Backend | None, recovery: float, now: Any) -> str | None:
    if row is None:
        return "closed"  # never seen: no reason to think it is down
    if row.disabled or row.health == Health.DOWN:
        return None
    if row.circuit == Circuit.CLOSED:
        return "closed"
    if row.circuit == Circuit.HALF_OPEN:
        return "trial"
    opened = row.opened_at
    if opened is None or (now - opened).total_seconds() >= recovery:
        return "trial"
    return None


def _pause(settings: Settings, stop: threading.Event) -> None:
    """Sleep between sweeps, jittered so relays and probes do not fall into step."""
    jitter = random.uniform(-SWEEP_JITTER, SWEEP_JITTER)
    stop.wait(settings.relay_interval * (1 + jitter))


def lead(relay: Relay, leader: Leadership, stop: threading.Event) -> None:
    """Sweep for as long as we hold leadership (LeadershipLost ends it) or until ``stop``."""
    while not stop.is_set():
        counts = relay.sweep(leader.check)
        if any(counts.values()):
            log.info("relay sweep: %s", counts)
        _pause(relay.settings, stop)


def run(
    relay: Relay,
    engine: Engine,
    prober: Prober | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Wait for leadership, sweep while it lasts, and wait again; until ``stop`` is set."""
    stop = stop or threading.Event()
    settings = relay.settings
    if prober is not None:
        prober.start()  # once per process; it probes only while we lead
    log.info("relay waiting for leadership")
    while not stop.is_set():
        try:
            with leadership(engine, settings, stop) as leader:
                log.info("relay active")
                with session_scope() as session:
                    circuit.ensure_rows(session, relay.config)
                if prober is not None:
                    prober.active.set()
                try:
                    lead(relay, leader, stop)
                finally:
                    if prober is not None:
                        prober.active.clear()
        except LeadershipLost as exc:
            if not stop.is_set():
                log.warning("relay lost leadership (%s); waiting to be elected again", exc)
        except Exception as exc:  # database or broker down: keep trying, lose nothing
            log.warning("relay sweep failed (%s: %s); retrying", type(exc).__name__, exc)
            _pause(settings, stop)


def run_forever(config: TierqConfig, settings: Settings, prober: Prober | None = None) -> None:
    run(Relay(config, settings), get_engine(), prober)
