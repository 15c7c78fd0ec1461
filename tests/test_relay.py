"""The relay's sweep against real Postgres and Redis: poison detection, leadership, replay
pacing, republishing and the health prober.

Each test uses tiers and backends of its own (fresh names), so queues and breakers of one
test never meet another's; jobs left active by a test are cancelled before the next.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml
from sqlalchemy import select, update

from simulator.faults import FaultSettings, Mode
from tests.simulator_fixture import running_simulator_handle
from tests.stack import pg_connect
from tests.test_metrics import add_jobs, update_job
from tierq.config import TierqConfig, parse_config
from tierq.settings import Settings
from worker.relay import Relay

RELAY_LOCK_ID = 0x7469657271
# The relay's lock in this test's database (other databases on the server have their own).
OUR_LOCK = (
    "locktype = 'advisory' AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


@pytest.fixture(autouse=True)
def quiet_database(env: dict[str, str]) -> Iterator[None]:
    """No job of an earlier test is still waiting to be reclaimed, replayed or published."""
    from tierq.db import session_scope
    from tierq.models import ACTIVE_STATUSES, Job

    with session_scope() as session:
        session.execute(
            update(Job).where(Job.status.in_(ACTIVE_STATUSES)).values(status="cancelled")
        )
    yield


def make_config(*tiers: list[dict[str, Any]], **extra: Any) -> TierqConfig:
    """Tiers with fresh names; each is a list of backends' overrides (name, max_concurrency…)."""
    suffix = uuid.uuid4().hex[:6]
    doc: dict[str, Any] = {
        "tiers": [
            {
                "name": f"t{i}-{suffix}",
                "backends": [
                    {
                        "protocol": "openai",
                        "url": "http://127.0.0.1:9",
                        "model": "m",
                        **backend,
                        "name": f"{backend.get('name', f'b{j}')}-{i}-{suffix}",
                    }
                    for j, backend in enumerate(backends)
                ],
            }
            for i, backends in enumerate(tiers)
        ],
        **extra,
    }
    return parse_config(yaml.safe_dump(doc))


def relay_for(config: TierqConfig, **settings: Any) -> Relay:
    from tierq.db import session_scope
    from worker import circuit

    with session_scope() as session:
        circuit.ensure_rows(session, config)
    return Relay(config, Settings(**settings))


def job(job_id: uuid.UUID) -> Any:
    from tierq.db import session_scope
    from tierq.models import Job

    with session_scope() as session:
        return session.get_one(Job, job_id)


def events(job_id: uuid.UUID) -> list[str]:
    from tierq.db import session_scope
    from tierq.models import JobEvent

    with session_scope() as session:
        return list(
            session.scalars(
                select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def set_backend(name: str, **values: Any) -> None:
    from tierq.db import session_scope
    from tierq.models import Backend

    with session_scope() as session:
        session.execute(update(Backend).where(Backend.name == name).values(**values))


def ago(seconds: float) -> Any:
    from tierq.db import db_now

    return db_now(-seconds)


# --- 1. poison detection counts dead workers, not claims ---------------------------------


def test_expired_lease_counts_a_lost_lease_not_a_delivery() -> None:
    config = make_config([{}])
    tier = config.tier_names[0]
    relay = relay_for(config, max_deliveries=3)
    retried_often, poison = add_jobs(
        {"status": "running", "tier": tier, "deliveries": 12, "lost_leases": 0},
        {"status": "running", "tier": tier, "deliveries": 2, "lost_leases": 2},
    )
    for job_id in (retried_often, poison):
        update_job(job_id, lease_expires_at=ago(1), lease_token=uuid.uuid4(), lease_owner="w")

    assert relay.sweep()["expired"] == 2

    requeued = job(retried_often)
    # Back in line after a random part of a third of its lease (see the test below).
    assert requeued.status in ("queued", "retry_wait"), requeued.status
    assert (requeued.lost_leases, requeued.deliveries) == (1, 12)
    assert requeued.lease_token is None and events(retried_often)[-1] == "requeued"
    dead = job(poison)
    assert (dead.status, dead.lost_leases) == ("dead", 3)
    assert "poison" in dead.error and "3 times" in dead.error
    assert events(poison)[-1] == "dead"


def test_jobs_of_a_dead_worker_come_back_apart_not_together() -> None:
    """One job that kills its worker takes its neighbours' leases with it, all expiring at
    once. Requeued together, they would be claimed together with the culprit and die with
    it again, until they too counted as poison. Each waits a random part of a third of its
    lease instead (on the database clock)."""
    config = make_config([{}])
    tier = config.tier_names[0]
    lease = 30.0
    relay = relay_for(config, max_deliveries=3, lease_seconds=lease)
    ids = add_jobs(*[{"status": "running", "tier": tier, "lost_leases": 0}] * 20)
    for job_id in ids:
        update_job(job_id, lease_expires_at=ago(1), lease_token=uuid.uuid4(), lease_owner="w")
    from tierq.db import db_now, session_scope

    with session_scope() as session:
        now = session.scalar(select(db_now()))
    assert relay._reclaim_expired() == 20
    waits = [(job(j).due_at - now).total_seconds() for j in ids]
    assert all(job(j).status == "retry_wait" for j in ids)
    assert all(-0.5 < wait <= lease / 3 + 0.5 for wait in waits), waits
    assert len({round(wait, 2) for wait in waits}) > 10, waits  # spread, not one instant


def test_live_lease_is_left_alone() -> None:
    config = make_config([{}])
    (running,) = add_jobs({"status": "running", "tier": config.tier_names[0], "lost_leases": 4})
    update_job(running, lease_expires_at=ago(-30), lease_token=uuid.uuid4(), lease_owner="w")

    relay_for(config, max_deliveries=5).sweep()

    assert (job(running).status, job(running).lost_leases) == ("running", 4)


# --- 5. republish only what the broker is short of ---------------------------------------


def queue_depth(env: dict[str, str], queue: str) -> int:
    from tierq.broker import redis_queue_depths

    return redis_queue_depths(env["TIERQ_BROKER_URL"], [queue])[queue]


def test_stale_backlog_is_republished_only_up_to_the_missing_messages(
    env: dict[str, str],
) -> None:
    config = make_config([{}])
    tier = config.tier_names[0]
    relay = relay_for(config, republish_after=5)
    backlog = add_jobs(*({"status": "queued", "tier": tier} for _ in range(10)))
    relay.sweep()  # never published: all published now
    assert queue_depth(env, tier) == 10

    def make_stale() -> None:
        for n, job_id in enumerate(backlog):  # the first job's publication is the oldest
            update_job(job_id, published_at=ago(100 - n))

    make_stale()
    assert relay.sweep()["published"] == 0, "every stale job still has its message"
    assert queue_depth(env, tier) == 10

    lost = redis.Redis.from_url(env["TIERQ_BROKER_URL"])
    for _ in range(3):
        assert lost.rpop(tier) is not None  # three messages vanish (popped, worker died)
    make_stale()
    assert relay.sweep()["published"] == 3
    assert queue_depth(env, tier) == 10
    republished = [
        job_id for job_id in backlog if job(job_id).published_at > job(backlog[-1]).published_at
    ]
    assert republished == backlog[:3], "the oldest publications go first"


def test_stale_webhook_backlog_is_republished_only_up_to_the_missing_messages(
    env: dict[str, str],
) -> None:
    from tierq.db import db_now, session_scope
    from tierq.models import Job, WebhookDelivery
    from tierq.webhooks import QUEUE, WebhookSettings
    from worker.webhook_delivery import publish_due_deliveries

    with session_scope() as session:  # no other test's delivery is still owed a message
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(status="failed")
        )
    queue = redis.Redis.from_url(env["TIERQ_BROKER_URL"])
    queue.delete(QUEUE)
    (job_id,) = add_jobs({"status": "succeeded", "tier": "gpu"})
    ids = [f"msg_backlog_{uuid.uuid4().hex}" for _ in range(6)]
    with session_scope() as session:
        owner = session.get_one(Job, job_id).owner_id
        for delivery_id in ids:
            session.add(
                WebhookDelivery(
                    id=delivery_id,
                    job_id=job_id,
                    owner_id=owner,
                    event_type="job.succeeded",
                    url="https://receiver.example/hook",
                    payload="{}",
                    next_attempt_at=db_now(),
                    expires_at=db_now(3600),
                )
            )
    settings = WebhookSettings(republish_after=5)
    assert publish_due_deliveries(settings) == 6  # never published: all published now
    assert queue_depth(env, QUEUE) == 6

    def make_stale() -> None:
        with session_scope() as session:
            for n, delivery_id in enumerate(ids):  # the first one is the oldest publication
                session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id)
                    .values(published_at=ago(100 - n))
                )

    make_stale()
    assert publish_due_deliveries(settings) == 0, "every stale delivery still has its message"
    assert queue_depth(env, QUEUE) == 6
    for _ in range(2):
        assert queue.rpop(QUEUE) is not None  # two messages vanish
    make_stale()
    assert publish_due_deliveries(settings) == 2
    assert queue_depth(env, QUEUE) == 6
    with session_scope() as session:
        newest = session.scalar(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.id.in_(ids))
            .order_by(WebhookDelivery.published_at.desc())
            .limit(2)
        )
    assert newest in ids[:2], "the oldest publications go first"
    queue.delete(QUEUE)


def test_blocked_jobs_are_not_counted_as_owed_a_message(env: dict[str, str]) -> None:
    config = make_config([{}])
    tier = config.tier_names[0]
    relay = relay_for(config, republish_after=5)
    first, second = add_jobs({"status": "parked", "tier": tier}, {"status": "queued", "tier": tier})
    update_job(second, after_job_id=first, published_at=ago(100))
    set_backend(config.tiers[0].backends[0].name, health="down")  # nothing to replay to

    assert relay.sweep()["published"] == 0
    assert queue_depth(env, tier) == 0


# --- 4. a flush during the publish step is noticed ---------------------------------------


class FlushedWhilePublishing(Relay):
    """The broker loses everything right while this relay publishes."""

    flush_next = True

    def _publish_pending(self) -> int:
        published = super()._publish_pending()
        if self.flush_next:
            self.flush_next = False
            redis.Redis.from_url(self.settings.effective_broker_url).flushall()
        return published


def test_flush_during_publish_is_noticed_on_the_next_sweep(env: dict[str, str]) -> None:
    config = make_config([{}])
    tier = config.tier_names[0]
    relay_for(config)
    relay = FlushedWhilePublishing(config, Settings())
    (queued,) = add_jobs({"status": "queued", "tier": tier})
    relay.sweep()
    assert queue_depth(env, tier) == 0, "the flush took the message"

    counts = relay.sweep()

    assert counts["broker_reset"] >= 1 and counts["published"] >= 1
    assert queue_depth(env, tier) == 1 and job(queued).published_at is not None


# --- 6, 7, 8. replay -----------------------------------------------------------------


def test_parked_predecessor_is_the_half_open_trial_despite_its_blocked_successor() -> None:
    config = make_config([{}])
    tier, backend = config.tier_names[0], config.tiers[0].backends[0].name
    relay = relay_for(config)
    set_backend(backend, circuit="half_open", health="healthy")
    parked, successor = add_jobs(
        {"status": "parked", "tier": tier}, {"status": "queued", "tier": tier}
    )
    update_job(successor, after_job_id=parked)

    assert relay.sweep()["replayed"] == 1

    assert job(parked).status == "queued" and "replayed" in events(parked)
    assert relay.sweep()["replayed"] == 0, "one trial at a time while half open"


def test_open_breaker_past_recovery_half_opens_without_traffic() -> None:
    from tierq.db import session_scope
    from tierq.models import Backend, CircuitTransition

    recovery = 5.0
    config = make_config([{"breaker": {"recovery_timeout": recovery}}])
    backend = config.tiers[0].backends[0].name
    relay = relay_for(config)
    set_backend(backend, circuit="open", opened_at=ago(recovery / 2), health="healthy")
    (parked,) = add_jobs({"status": "parked", "tier": "emergency"})

    assert relay.sweep()["replayed"] == 0, "still inside the recovery timeout"
    set_backend(backend, opened_at=ago(recovery + 1))
    counts = relay.sweep()

    with session_scope() as session:
        assert session.get_one(Backend, backend).circuit == "half_open"
        moves = session.execute(
            select(CircuitTransition.from_state, CircuitTransition.to_state).where(
                CircuitTransition.backend == backend
            )
        ).all()
    assert moves == [("open", "half_open")]
    assert counts["half_opened"] == 1 and counts["replayed"] == 1
    assert job(parked).status == "queued" and job(parked).tier == config.tier_names[0]


def test_parked_job_past_its_deadline_fails_without_being_replayed() -> None:
    config = make_config([{}])
    relay = relay_for(config)
    expired, alive = add_jobs(
        {"status": "parked", "tier": "emergency", "age_seconds": 10},
        {"status": "parked", "tier": "emergency"},
    )
    update_job(expired, deadline=ago(1))
    time.sleep(0.5)  # replay credit for both

    counts = relay.sweep()

    assert job(expired).status == "failed" and "replayed" not in events(expired)
    assert counts["timed_out"] == 1 and counts["replayed"] == 1
    assert job(alive).status == "queued"


def test_replay_releases_highest_priority_then_oldest() -> None:
    config = make_config([{}], emergency={"replay_rate": 3})
    relay = relay_for(config, relay_interval=1.0)
    parked = add_jobs(
        *(
            {"status": "parked", "tier": "emergency", "priority": p, "age_seconds": age}
            for p, age in [(0, 50), (5, 10), (0, 40), (5, 20), (0, 30), (0, 60), (1, 1)]
        )
    )
    time.sleep(1.5)  # credit for 4.5 jobs; the bucket holds a second's worth: 3

    assert relay.sweep()["replayed"] == 3
    released = {job_id for job_id in parked if job(job_id).status == "queued"}
    # priority 5 (the older first), then priority 1
    assert released == {parked[3], parked[1], parked[6]}


def test_replay_reaches_the_configured_rate_however_small_the_backends() -> None:
    config = make_config([{"max_concurrency": 1}], emergency={"replay_rate": 20})
    relay = relay_for(config, relay_interval=0.5)
    parked = add_jobs(*({"status": "parked", "tier": "emergency"} for _ in range(40)))
    time.sleep(2.0)  # 40 jobs' worth of rate, but a stalled relay gets a second's worth

    first_started = time.monotonic()
    assert relay.sweep()["replayed"] == 20, "rate x 1 s at most, not the 1 call in flight"
    time.sleep(0.5)
    # then rate x the time since the last sweep: 0.5 s plus the sweeps' own work
    second = relay.sweep()["replayed"]
    most = min(20, int(20 * (time.monotonic() - first_started)) + 1)
    assert 10 <= second <= most, (second, most)
    assert sum(job(job_id).status == "queued" for job_id in parked) == 20 + second


def test_relay_sweeps_are_jittered() -> None:
    from worker.relay import SWEEP_JITTER, _pause

    settings = Settings(relay_interval=0.05)
    never = threading.Event()
    pauses = []
    for _ in range(8):
        started = time.monotonic()
        _pause(settings, never)
        pauses.append(time.monotonic() - started)
    assert min(pauses) >= 0.05 * (1 - SWEEP_JITTER) - 0.005
    assert len({round(p, 4) for p in pauses}) > 1, "all pauses the same: no jitter"


# --- 9. a broker outage stops the publish steps at their first failure --------------------


@pytest.fixture
def dead_broker(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from tests.conftest import _reset_caches
    from tests.services import free_port

    monkeypatch.setenv("TIERQ_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    _reset_caches()
    yield
    monkeypatch.undo()
    _reset_caches()


def add_due_webhooks(count: int) -> None:
    from tierq.db import db_now, session_scope
    from tierq.models import Job, WebhookDelivery

    (job_id,) = add_jobs({"status": "succeeded", "tier": "x"})
    with session_scope() as session:
        owner = session.get_one(Job, job_id).owner_id
        for n in range(count):
            session.add(
                WebhookDelivery(
                    id=f"msg_{uuid.uuid4().hex}",
                    job_id=job_id,
                    owner_id=owner,
                    event_type="job.succeeded",
                    url="http://127.0.0.1:9/hook",
                    payload="{}",
                    next_attempt_at=db_now(-n),
                    expires_at=db_now(3600),
                )
            )


def test_broker_down_costs_one_failed_publish_per_step(
    dead_broker: None, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.webhook_delivery import publish_due_deliveries

    config = make_config([{}])
    relay = relay_for(config)
    add_jobs(*({"status": "queued", "tier": config.tier_names[0]} for _ in range(4)))
    add_due_webhooks(4)
    caplog.set_level(logging.WARNING)

    assert relay._publish_pending() == 0
    assert publish_due_deliveries() == 0

    failed = [r.getMessage() for r in caplog.records if "publish of" in r.getMessage()]
    assert sum("publish of job" in m for m in failed) == 1, failed
    assert sum("publish of webhook" in m for m in failed) == 1, failed


# --- 2. leadership -----------------------------------------------------------------------


class RecordingRelay(Relay):
    """Writes down when each of its sweeps ran, to show two never overlap."""

    def __init__(self, name: str, config: TierqConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.name = name
        self.sweeps: list[tuple[float, float]] = []

    def sweep(self, still_leader: Any = lambda: None) -> dict[str, int]:
        """A sweep starts doing work once its first leadership check passes."""
        began: float | None = None

        def checked() -> None:
            nonlocal began
            still_leader()
            began = began or time.monotonic()

        try:
            return super().sweep(checked)
        finally:
            if began is not None:
                self.sweeps.append((began, time.monotonic()))

    def sweeps_since(self, moment: float) -> int:
        return sum(1 for started, _ in self.sweeps if started > moment)


class RelayThread:
    def __init__(self, relay: RecordingRelay) -> None:
        from tierq.db import get_engine
        from worker.relay import run

        self.relay, self.stop = relay, threading.Event()
        self.thread = threading.Thread(
            target=run, args=(relay, get_engine(), None, self.stop), daemon=True
        )
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def lock_holders(database_url: str) -> list[int]:
    with pg_connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT pid FROM pg_locks WHERE {OUR_LOCK} AND granted",
            (RELAY_LOCK_ID,),
        ).fetchall()
    return [row[0] for row in rows]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    from tests.services import wait_until

    wait_until(predicate, timeout, 0.02, what=what)


class LockQueue:
    """A session of the test's own waiting for the relay lock (pg_advisory_lock blocks):
    Postgres hands it the lock the moment the holder's session ends, before any relay can
    try again, so the test decides who holds it next."""

    def __init__(self, database_url: str) -> None:
        self.conn = pg_connect(database_url)
        self.pid = self.conn.info.backend_pid
        self.thread = threading.Thread(
            target=self.conn.execute, args=("SELECT pg_advisory_lock(%s)", (RELAY_LOCK_ID,))
        )
        self.thread.start()

    def release(self) -> None:
        self.thread.join(10)
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (RELAY_LOCK_ID,))
        self.conn.close()


def lock_waiters(database_url: str) -> list[int]:
    with pg_connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT pid FROM pg_locks WHERE {OUR_LOCK} AND NOT granted", (RELAY_LOCK_ID,)
        ).fetchall()
    return [row[0] for row in rows]


def test_relay_that_loses_its_lock_stops_sweeping_until_it_holds_it_again(
    env: dict[str, str],
) -> None:
    url = env["TIERQ_DATABASE_URL"]
    interval = 0.1
    settings = Settings(relay_interval=interval)
    config = make_config([{}])
    first = RecordingRelay("first", config, settings)
    second = RecordingRelay("second", config, settings)
    # A standby tries the lock every second; sweeps are relay_interval ± 20 % apart.
    takeover = 1.0 + 2 * interval + 5.0  # headroom for a loaded machine
    threads = {"first": RelayThread(first)}
    try:
        wait_for(lambda: first.sweeps_since(0) >= 3, 10, "the first relay sweeping")
        threads["second"] = RelayThread(second)
        time.sleep(1.5)  # the standby has tried the lock at least once
        assert second.sweeps == [], "the standby swept while the first relay led"

        (holder,) = lock_holders(url)
        queue = LockQueue(url)
        wait_for(lambda: queue.pid in lock_waiters(url), 5, "the test queued for the lock")
        with pg_connect(url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (holder,))
        lost = time.monotonic()
        wait_for(lambda: lock_holders(url) == [queue.pid], 5, "the test to hold the lock")
        time.sleep(2.0)  # neither relay holds the lock now
        queue.release()
        released = time.monotonic()

        sweeps = first.sweeps + second.sweeps
        assert not [s for s, _ in sweeps if lost < s < released], "swept without the lock"
        assert all(end < lost + 1.0 for s, end in sweeps if s < lost), "a sweep went on"
        wait_for(
            lambda: first.sweeps_since(released) + second.sweeps_since(released) >= 3,
            takeover,
            "a relay to sweep again once it holds the lock",
        )
        leader = max((first, second), key=lambda relay: relay.sweeps_since(released))
        standby = second if leader is first else first
        threads.pop(leader.name).end()  # gives the lock up on the way out
        stopped = time.monotonic()
        wait_for(lambda: standby.sweeps_since(stopped) >= 1, takeover, "the standby takes over")
    finally:
        for thread in threads.values():
            thread.end()

    assert_never_overlapped(first.sweeps, second.sweeps)


def assert_never_overlapped(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    for a_start, a_end in a:
        for b_start, b_end in b:
            assert a_end <= b_start or b_end <= a_start, "two relays swept at the same time"


# --- 3. the health prober ------------------------------------------------------------


def test_prober_skips_disabled_backends_and_a_hanging_canary_holds_up_only_itself() -> None:
    from tierq.db import session_scope
    from tierq.models import Backend
    from worker.health import Prober, canary_timeout

    # Rounds start every 0.5 s; the hanging canary is given 3 s (three times the degraded latency).
    health = {"interval": 0.2, "degraded_latency_ms": 1000}
    hang = FaultSettings(mode=Mode.HANG, scope="chat")
    with (
        running_simulator_handle("well") as well,
        running_simulator_handle("off") as off,
        running_simulator_handle("stuck", hang) as stuck,
    ):
        config = make_config(
            [
                {"name": "well", "url": well.url, "health": health},
                {"name": "off", "url": off.url, "health": health},
                {"name": "stuck", "url": stuck.url, "health": health, "read_timeout": 60},
            ]
        )
        names = {b.name.split("-")[0]: b.name for b in config.tiers[0].backends}
        relay_for(config)
        set_backend(names["off"], disabled=True)
        bound = canary_timeout(config.backends[names["stuck"]])
        assert bound == 3.0
        prober = Prober(config)
        prober.start()
        prober.start()
        assert [t.name for t in threading.enumerate()].count("health-prober") == 1
        time.sleep(0.7)
        assert calls(well) == 0, "probing before the relay leads"
        try:
            prober.active.set()
            wait_for(lambda: calls(stuck) >= 2, 10, "the stuck canary sent")
            hanging_since, probed = time.monotonic(), calls(well)
            # Two more probes (liveness and canary each) while the other canary hangs.
            wait_for(
                lambda: calls(well) >= probed + 4,
                bound,
                "the healthy backend probed again while the other canary hangs",
            )
            wait_for(lambda: _health(names["stuck"]) == "down", bound + 5, "the canary timed out")
            assert time.monotonic() - hanging_since <= bound + 5
        finally:
            prober.active.clear()

    assert calls(off) == 0, "a disabled backend was called"
    with session_scope() as session:
        assert session.get_one(Backend, names["well"]).health == "healthy"
        assert session.get_one(Backend, names["off"]).last_probe_at is None


def calls(simulator: Any) -> int:
    return sum(simulator.app.stats.endpoints.values())


def _health(name: str) -> str:
    from tierq.db import session_scope
    from tierq.models import Backend

    with session_scope() as session:
        return session.get_one(Backend, name).health


# --- 2, across processes: `tierq beat` ------------------------------------------------


def published(job_id: uuid.UUID) -> bool:
    return job(job_id).published_at is not None


def test_beat_processes_hand_leadership_over_and_never_publish_without_the_lock(
    env: dict[str, str], tmp_path: Any
) -> None:
    from tests.stack import Stack, tier_file

    url = env["TIERQ_DATABASE_URL"]
    tier = f"p-{uuid.uuid4().hex[:6]}"
    config = tier_file(tmp_path, {tier: [(f"{tier}-b", "openai", "http://127.0.0.1:9")]})
    stack = Stack({**env, "TIERQ_CONFIG": str(config), "TIERQ_RELAY_INTERVAL": "0.2"}, tmp_path)
    active = "relay active"
    try:
        first = stack.spawn("beat-1", "beat")
        wait_for(lambda: active in first.output(), 30, "the first beat leading")
        second = stack.spawn("beat-2", "beat")
        wait_for(lambda: "waiting for leadership" in second.output(), 30, "the second beat")
        (early,) = add_jobs({"status": "queued", "tier": tier})
        wait_for(lambda: published(early), 10, "the leader publishing")
        assert active not in second.output()

        (holder,) = lock_holders(url)
        queue = LockQueue(url)
        wait_for(lambda: queue.pid in lock_waiters(url), 5, "the test queued for the lock")
        with pg_connect(url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (holder,))
        wait_for(lambda: lock_holders(url) == [queue.pid], 5, "the test to hold the lock")
        wait_for(lambda: "lost leadership" in first.output(), 5, "the first beat to notice")
        (orphan,) = add_jobs({"status": "queued", "tier": tier})
        time.sleep(2.0)  # ten sweep intervals: no beat holds the lock
        assert not published(orphan), "a beat published without holding the lock"
        queue.release()
        wait_for(lambda: published(orphan), 10, "a beat leading again")

        elections = (first.output().count(active), second.output().count(active))
        assert elections in ((2, 0), (1, 1)), "exactly one beat leads again"
        leader, standby = (first, second) if elections == (2, 0) else (second, first)
        leader.kill_group()
        (late,) = add_jobs({"status": "queued", "tier": tier})
        wait_for(lambda: published(late), 10, "the standby taking over")
        assert standby.alive() and active in standby.output()
    finally:
        stack.stop()


class FailingOnce(RecordingRelay):
    """Its second sweep fails, as one does when the database drops a connection."""

    def sweep(self, still_leader: Any = lambda: None) -> dict[str, int]:
        if len(self.sweeps) == 1 and not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("the database went away mid-sweep")
        return super().sweep(still_leader)


def test_a_failed_sweep_gives_the_lock_back_and_the_relay_leads_again(
    env: dict[str, str],
) -> None:
    # The lock's connection used to go back to the pool still holding the lock, where no
    # new election could get it: the relay would wait for leadership it already had.
    relay = FailingOnce("only", make_config([{}]), Settings(relay_interval=0.1))
    thread = RelayThread(relay)
    try:
        wait_for(lambda: len(relay.sweeps) >= 3, 10, "sweeps after the failed one")
    finally:
        thread.end()
    assert relay.failed
    assert lock_holders(env["TIERQ_DATABASE_URL"]) == [], "the lock outlived the relay"


def test_folder_broker_queues_are_counted_from_its_message_files(tmp_path: Any) -> None:
    from celery import Celery
    from kombu import Exchange, Queue

    from tierq import broker
    from tierq.broker import folder_queue_depths

    settings = Settings(home=tmp_path, broker_url="atomicfs://")
    app = Celery("count", set_as_current=False)
    broker.configure(app, settings)
    for queue, count in (("gpu", 3), ("cpu", 1)):
        for _ in range(count):
            app.send_task(broker.RUN_JOB, args=["x"], queue=Queue(queue, Exchange(""), queue))
    (settings.broker_folder / "queue" / ".half-written.gpu.msg.partial").write_text("")

    depths = folder_queue_depths(settings.broker_folder / "queue", ["gpu", "cpu", "hosted"])

    assert depths == {"gpu": 3, "cpu": 1, "hosted": 0}
