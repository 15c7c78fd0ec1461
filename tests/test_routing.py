"""Routing inside a tier and the retry timing, against the real database where their state
lives: concurrency caps counted across workers, the slow-start ramp, health preference,
race-safe slot taking."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import select, update

from tierq import leases as claim
from tierq.config import TierConfig, TierqConfig, parse_config
from tierq.db import db_now, session_scope
from tierq.models import Backend, Conversation, Job, Turn
from worker import routing

# --- building jobs and tiers the way the API and the configuration would ---------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def backend_doc(name: str, url: str = "http://127.0.0.1:9", **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "openai",
        "url": url,
        "model": f"{name}-model",
        "connect_timeout": 0.5,
        "read_timeout": 5,
        **options,
    }


def tier_doc(name: str, *backends: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backends": list(backends),
        "retry": {"attempts": 2, "base_delay": 0.05, "max_delay": 0.2},
        **options,
    }


def config_of(*tiers: dict[str, Any], **extra: Any) -> TierqConfig:
    import yaml

    return parse_config(yaml.safe_dump({"tiers": list(tiers), **extra}))


def new_owner() -> uuid.UUID:
    from tierq.keys import create_key

    with session_scope() as session:
        return uuid.UUID(str(create_key(session, "routing").id))


def queued_job(
    tier: str, content: str = "hello", owner: uuid.UUID | None = None, **fields: Any
) -> uuid.UUID:
    """A job queued on ``tier`` with one user turn, as the API writes it."""
    owner = owner or new_owner()
    request = {"model": "any", "messages": [{"role": "user", "content": content}]}
    with session_scope() as session:
        conversation = Conversation(owner_id=owner, turn_count=2)
        session.add(conversation)
        session.flush()
        job = Job(
            owner_id=owner,
            conversation_id=conversation.id,
            answer_seq=1,
            tier=tier,
            request=request,
            request_hash="x" * 64,
            **fields,
        )
        session.add(job)
        session.flush()
        session.add(Turn(conversation_id=conversation.id, seq=0, role="user", content=content))
        return job.id


def claimed(job_id: uuid.UUID, tier: str, seconds: float = 30) -> claim.Lease:
    with session_scope() as session:
        lease = claim.claim(session, job_id, tier, f"test-{uuid.uuid4().hex[:4]}", seconds)
    assert lease is not None
    return lease


def choose(config: TierqConfig, tier: TierConfig, lease: claim.Lease) -> Any:
    with session_scope() as session:
        return routing.choose(session, config, tier, lease)


def end_call(lease: claim.Lease) -> None:
    with session_scope() as session:
        claim.end_call(session, lease)


def set_backend(name: str, **values: Any) -> None:
    with session_scope() as session:
        if session.get(Backend, name) is None:  # not routed to yet
            session.add(Backend(name=name, tier="test"))
            session.flush()
        session.execute(update(Backend).where(Backend.name == name).values(**values))


def set_job(job_id: uuid.UUID, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def calling(job_id: uuid.UUID) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Job.calling_backend).where(Job.id == job_id))


def one_tier(*backends: dict[str, Any], **options: Any) -> tuple[TierqConfig, TierConfig]:
    name = unique("t")
    config = config_of(tier_doc(name, *backends, **options))
    return config, config.tier(name)


def tier_only(*backends: dict[str, Any], **options: Any) -> TierConfig:
    return one_tier(*backends, **options)[1]


def leases(tier: TierConfig, count: int) -> list[claim.Lease]:
    return [claimed(queued_job(tier.name), tier.name) for _ in range(count)]


# --- concurrency caps -----------------------------------------------------------------


def test_a_backend_takes_no_more_calls_than_its_cap(env: dict[str, str]) -> None:
    name = unique("b")
    config, tier = one_tier(backend_doc(name, max_concurrency=2))
    first, second, third = leases(tier, 3)
    assert isinstance(choose(config, tier, first), routing.Route)
    assert isinstance(choose(config, tier, second), routing.Route)
    full = choose(config, tier, third)
    assert full == routing.Full((name,))
    assert calling(third.job_id) is None  # a job that got no slot holds none
    end_call(first)
    assert calling(first.job_id) is None
    route = choose(config, tier, third)
    assert isinstance(route, routing.Route) and route.backend.name == name
    assert calling(third.job_id) == name


def test_a_dead_workers_call_stops_counting_when_its_lease_runs_out(env: dict[str, str]) -> None:
    name = unique("b")
    config, tier = one_tier(backend_doc(name, max_concurrency=1))
    dead, alive = leases(tier, 2)
    assert isinstance(choose(config, tier, dead), routing.Route)
    assert isinstance(choose(config, tier, alive), routing.Full)
    set_job(dead.job_id, lease_expires_at=db_now(-1))  # its worker died mid-call
    assert isinstance(choose(config, tier, alive), routing.Route)


def test_a_full_backend_sends_the_next_job_to_one_with_room(env: dict[str, str]) -> None:
    names = [unique("b"), unique("b")]
    config, tier = one_tier(*(backend_doc(n, max_concurrency=1) for n in names))
    chosen = [choose(config, tier, lease) for lease in leases(tier, 3)]
    assert sorted(r.backend.name for r in chosen[:2]) == sorted(names)
    assert isinstance(chosen[2], routing.Full) and set(chosen[2].backends) == set(names)


def test_a_tier_with_nothing_alive_is_not_full(env: dict[str, str]) -> None:
    name = unique("b")
    config, tier = one_tier(backend_doc(name, max_concurrency=1))
    busy, waiting = leases(tier, 2)
    assert isinstance(choose(config, tier, busy), routing.Route)
    set_backend(name, circuit="open", opened_at=db_now())  # at its cap, but open now
    assert choose(config, tier, waiting) is None
    set_backend(name, circuit="closed", disabled=True)
    assert choose(config, tier, waiting) is None


def test_racing_workers_never_take_more_slots_than_the_cap(env: dict[str, str]) -> None:
    cap, workers = 2, 8
    name = unique("b")
    config, tier = one_tier(backend_doc(name, max_concurrency=cap))
    for _ in range(3):
        racers = leases(tier, workers)
        start = threading.Barrier(workers)
        results: list[Any] = []

        def race(lease: claim.Lease, start: threading.Barrier, results: list[Any]) -> None:
            start.wait()
            results.append(choose(config, tier, lease))

        threads = [threading.Thread(target=race, args=(lease, start, results)) for lease in racers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        routes = [r for r in results if isinstance(r, routing.Route)]
        assert len(results) == workers
        assert len(routes) == cap, results
        for lease in racers:
            end_call(lease)


# --- slow start and health -------------------------------------------------------------


def test_slow_start_caps_the_only_backend_of_a_tier(env: dict[str, str]) -> None:
    name = unique("b")
    breaker = {"slow_start_seconds": 100}
    config, tier = one_tier(backend_doc(name, max_concurrency=10), breaker=breaker)
    jobs = leases(tier, 6)
    assert isinstance(choose(config, tier, jobs[0]), routing.Route)  # creates the row
    set_backend(name, closed_at=db_now())  # just recovered: ramp at its floor, cap 1
    assert isinstance(choose(config, tier, jobs[1]), routing.Full)
    set_backend(name, closed_at=db_now(-50))  # half way: cap 5
    got = [choose(config, tier, lease) for lease in jobs[1:]]
    assert [isinstance(r, routing.Route) for r in got] == [True] * 4 + [False]
    set_backend(name, closed_at=db_now(-1000))  # ramp over: the full cap of 10
    assert isinstance(choose(config, tier, jobs[5]), routing.Route)


def test_effective_cap_follows_the_ramp() -> None:
    tier = tier_only(backend_doc("x", max_concurrency=8))
    backend = tier.backends[0]
    assert routing.effective_cap(backend, routing.MIN_RAMP) == 1
    assert routing.effective_cap(backend, 0.5) == 4
    assert routing.effective_cap(backend, 1.0) == 8


def test_healthy_backends_come_before_degraded_ones(env: dict[str, str]) -> None:
    healthy, degraded = unique("healthy"), unique("degraded")
    config, tier = one_tier(
        backend_doc(degraded, max_concurrency=1), backend_doc(healthy, max_concurrency=1)
    )
    [probe] = leases(tier, 1)
    choose(config, tier, probe)  # creates the rows
    end_call(probe)
    set_backend(degraded, health="degraded", last_latency_ms=1.0)  # faster, but slow to probe
    set_backend(healthy, health="healthy", last_latency_ms=500.0)
    for _ in range(10):
        route = choose(config, tier, probe)
        assert route.backend.name == healthy
        end_call(probe)
    first, second = leases(tier, 2)
    assert choose(config, tier, first).backend.name == healthy
    assert choose(config, tier, second).backend.name == degraded  # better than waiting
