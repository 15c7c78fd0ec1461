"""How a worker runs a job within its limits: the call slots of a backend, Retry-After and
the deadline, the attempt record when the lease is lost, degradation, the minimal tier's
cache. The runner runs here in-process against real Postgres, Redis and simulators; the
concurrency cap is also shown end to end with real worker processes."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from simulator.control import SimulatorControl
from simulator.server import RunningSimulator
from tests.deployment import backend, deployment, tier
from tests.services import wait_until
from tests.simulator_fixture import running_simulator_handle
from tests.test_routing import (
    backend_doc,
    choose,
    claimed,
    config_of,
    new_owner,
    queued_job,
    set_backend,
    set_job,
    tier_doc,
    unique,
)
from tierq.config import TierqConfig
from tierq.db import db_now, session_scope
from tierq.models import Attempt, Backend, Job, JobEvent
from tierq.settings import get_settings
from worker.calls import Calls
from worker.runner import JobRunner


@pytest.fixture(scope="module")
def primary() -> Iterator[RunningSimulator]:
    with running_simulator_handle("primary-sim") as sim:
        yield sim


@pytest.fixture(scope="module")
def secondary() -> Iterator[RunningSimulator]:
    with running_simulator_handle("secondary-sim") as sim:
        yield sim


@pytest.fixture
def faults(primary: RunningSimulator) -> Iterator[SimulatorControl]:
    # A call an earlier test gave up on may still be running there: start from none.
    wait_until(lambda: primary.app.stats.in_flight == 0, 10, what="the simulator idle")
    with SimulatorControl(primary.url) as control:
        control.reset()
        yield control
        control.reset()


def two_tiers(
    primary: str,
    secondary: str,
    degrade: dict[str, Any] | None = None,
    **primary_options: Any,
) -> tuple[TierqConfig, str, str]:
    """gpu (one backend on ``primary``) → cpu (one on ``secondary``); unique names."""
    gpu, cpu = unique("gpu"), unique("cpu")
    config = config_of(
        tier_doc(gpu, backend_doc(unique("p"), primary, **primary_options)),
        tier_doc(cpu, backend_doc(unique("s"), secondary), degrade=degrade or {}),
    )
    return config, gpu, cpu


@functools.cache
def _calls() -> Calls:
    return Calls()  # one call loop for the test process, as a worker process has


def runner(config: TierqConfig) -> JobRunner:
    return JobRunner(config, get_settings(), f"test-{uuid.uuid4().hex[:6]}", _calls())


def job_row(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def attempts_of(job_id: uuid.UUID) -> list[tuple[str, str | None]]:
    with session_scope() as session:
        rows = session.execute(
            select(Attempt.outcome, Attempt.error_class)
            .where(Attempt.job_id == job_id)
            .order_by(Attempt.id)
        ).all()
    return [tuple(r) for r in rows]


def events_of(job_id: uuid.UUID) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def backend_row(name: str) -> Backend:
    with session_scope() as session:
        return session.get_one(Backend, name)


def content(job: Job) -> str:
    assert job.result is not None, job.error
    return job.result["choices"][0]["message"]["content"]


# --- the minimal tier's cache belongs to one key ---------------------------------------


def test_cached_answers_never_cross_api_keys(
    env: dict[str, str], primary: RunningSimulator, faults: SimulatorControl
) -> None:
    gpu = unique("gpu")
    name = unique("p")
    config = config_of(
        tier_doc(gpu, backend_doc(name, primary.url)),
        minimal={"cache_max_age": 600, "static_message": "Down; saved."},
        on_exhausted="degrade",
    )
    worker = runner(config)
    question = f"what did I tell you in secret? {uuid.uuid4()}"
    alice, bob = new_owner(), new_owner()
    answered = queued_job(gpu, question, owner=alice)
    worker.run(answered, gpu)
    original = job_row(answered)
    assert original.status == "succeeded" and original.quality == "full"
    set_backend(name, disabled=True)  # no model tier: the minimal tier answers
    from_bob = queued_job(gpu, question, owner=bob)
    worker.run(from_bob, gpu)
    bobs = job_row(from_bob)
    assert bobs.status == "succeeded" and bobs.quality == "static", bobs.result
    assert content(bobs) != content(original)
    from_alice = queued_job(gpu, question, owner=alice)
    worker.run(from_alice, gpu)
    alices = job_row(from_alice)
    assert alices.quality == "cached" and content(alices) == content(original)
    assert alices.backend == str(answered)


# --- Retry-After and the deadline ------------------------------------------------------


def test_a_long_retry_after_moves_the_job_on_instead_of_holding_it(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, cpu = two_tiers(primary.url, secondary.url)
    faults.set_faults(mode="rate_limit", retry_after=3600)
    job_id = queued_job(gpu)
    runner(config).run(job_id, gpu)
    job = job_row(job_id)
    assert (job.status, job.tier) == ("queued", cpu), (job.status, job.error)
    assert job.due_at is None
    assert attempts_of(job_id) == [("error", "rate_limited")]
    assert events_of(job_id)[-1] == "escalated"


def test_a_short_retry_after_is_waited_on_the_same_tier(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, _ = two_tiers(primary.url, secondary.url)
    faults.set_faults(mode="rate_limit", retry_after=0.15)  # under max_delay (0.2)
    job_id = queued_job(gpu)
    runner(config).run(job_id, gpu)
    job = job_row(job_id)
    assert (job.status, job.tier) == ("retry_wait", gpu)


def test_the_deadline_bounds_a_calls_timeout(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, _ = two_tiers(primary.url, secondary.url)
    faults.set_faults(latency_ms=4000)  # answers within read_timeout (5 s), after the deadline
    job_id = queued_job(gpu, deadline=db_now(1.0))
    started = time.monotonic()
    runner(config).run(job_id, gpu)
    elapsed = time.monotonic() - started
    job = job_row(job_id)
    assert job.status == "failed" and "deadline" in (job.error or ""), job.error
    assert attempts_of(job_id) == [("error", "timeout")]
    assert elapsed < 3.0, elapsed  # 1 s deadline plus headroom; unbounded it would be 4 s


def test_a_retry_due_after_the_deadline_is_not_waited_for(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, cpu = two_tiers(primary.url, secondary.url)
    faults.set_faults(mode="rate_limit", retry_after=0.15)
    job_id = queued_job(gpu, deadline=db_now(0.1))  # the retry would be due after it
    runner(config).run(job_id, gpu)
    job = job_row(job_id)
    assert job.status != "retry_wait", job.status
    assert (job.status, job.tier) in (("queued", cpu), ("failed", gpu))


# --- the attempt record survives a lost lease -----------------------------------------


def run_losing_the_lease(
    worker: JobRunner, job_id: uuid.UUID, tier_name: str, sim: RunningSimulator
) -> None:
    """Run the job; while its call is in flight, another worker takes the job over."""
    thread = threading.Thread(target=worker.run, args=(job_id, tier_name))
    thread.start()
    wait_until(lambda: sim.app.stats.in_flight > 0, 10, what="the call")
    set_job(job_id, lease_token=uuid.uuid4(), lease_owner="another-worker")
    thread.join(30)
    assert not thread.is_alive()


def test_an_answer_after_the_lease_was_lost_keeps_the_attempt_and_breaker_record(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, _ = two_tiers(primary.url, secondary.url)
    name = config.tier(gpu).backends[0].name
    faults.set_faults(latency_ms=800)
    worker = runner(config)
    warm = queued_job(gpu)
    worker.run(warm, gpu)  # creates the backend row
    set_backend(name, circuit="half_open", trial_until=None, trial_successes=0)
    job_id = queued_job(gpu)
    run_losing_the_lease(worker, job_id, gpu, primary)
    job = job_row(job_id)
    assert job.status == "running" and job.lease_owner == "another-worker"
    assert job.result is None
    assert attempts_of(job_id) == [("ok", None)]  # the call happened, and is on record
    assert (job.attempts, job.tier_attempts) == (0, 0)  # the new owner's tries are intact
    row = backend_row(name)
    assert row.trial_successes == 1 and row.trial_until is None  # trial slot given back


def test_an_error_after_the_lease_was_lost_uses_none_of_the_new_owners_tries(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator, faults
) -> None:
    config, gpu, _ = two_tiers(primary.url, secondary.url)
    faults.set_faults(mode="error_500", latency_ms=800)
    job_id = queued_job(gpu)
    run_losing_the_lease(runner(config), job_id, gpu, primary)
    job = job_row(job_id)
    assert (job.status, job.tier, job.lease_owner) == ("running", gpu, "another-worker")
    assert (job.attempts, job.tier_attempts) == (0, 0)
    assert attempts_of(job_id) == [("error", "server")]
    assert job.calling_backend == config.tier(gpu).backends[0].name  # not ours to clear


# --- degradation -----------------------------------------------------------------------


def test_degrade_model_is_the_model_a_degraded_request_asks_for(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator
) -> None:
    config, gpu, cpu = two_tiers(
        primary.url, secondary.url, degrade={"model": "tiny-1b", "notice": "Smaller model."}
    )
    set_backend(config.tier(gpu).backends[0].name, disabled=True)
    worker = runner(config)
    job_id = queued_job(gpu)
    worker.run(job_id, gpu)
    assert (job_row(job_id).status, job_row(job_id).tier) == ("queued", cpu)
    worker.run(job_id, cpu)
    job = job_row(job_id)
    assert job.status == "succeeded" and job.quality == "reduced"
    assert job.model == "tiny-1b"  # the simulator answers with the model it was asked for
    assert job.result["model"] == "tiny-1b"


def test_the_first_tier_uses_its_backends_own_model(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator
) -> None:
    config, gpu, _ = two_tiers(primary.url, secondary.url, degrade={"model": "tiny-1b"})
    job_id = queued_job(gpu)
    runner(config).run(job_id, gpu)
    assert job_row(job_id).model == config.tier(gpu).backends[0].model


# --- a full tier waits; end to end with real workers -----------------------------------


def test_a_full_tier_makes_the_job_wait_on_it(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator
) -> None:
    config, gpu, cpu = two_tiers(primary.url, secondary.url, max_concurrency=1)
    gpu_tier = config.tier(gpu)
    holder = claimed(queued_job(gpu), gpu)  # another worker's call fills the only slot
    assert choose(config, gpu_tier, holder).backend.name == gpu_tier.backends[0].name
    waiting = queued_job(gpu)
    runner(config).run(waiting, gpu)
    job = job_row(waiting)
    assert (job.status, job.tier) == ("retry_wait", gpu)
    assert job.tier_attempts == 0 and attempts_of(waiting) == []  # nothing was called
    assert job.calling_backend is None
    near = queued_job(gpu, deadline=db_now(0.08))  # cannot wait for a slot
    runner(config).run(near, gpu)
    job = job_row(near)
    assert job.status != "retry_wait"
    assert (job.status, job.tier) == ("queued", cpu) or "deadline" in (job.error or "")


def one_slow_backend(urls: dict[str, str]) -> dict[str, Any]:
    return {
        "tiers": [
            tier("gpu", backend("gpu-sim", "openai", urls["gpu-sim"], max_concurrency=1)),
            tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"])),
        ]
    }


@pytest.mark.slow
def test_a_backend_never_gets_more_calls_than_its_cap(tmp_path: Path) -> None:
    with deployment(tmp_path, config=one_slow_backend) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu", calls=4)
        d.stack.worker("cpu")
        d.fault("gpu-sim", latency_ms=600)
        with d.client() as client:
            ids = [d.submit(client, f"question {i}").json()["id"] for i in range(4)]
            done = [client.get(f"/v1/jobs/{i}", params={"wait": 40}).json() for i in ids]
        import httpx

        stats = httpx.get(f"{d.simulators['gpu-sim']}/_sim/stats").json()
        assert stats["max_in_flight"] == 1, stats
        assert [j["status"] for j in done] == ["succeeded"] * 4, done
        assert {j["served_by"]["backend"] for j in done} == {"gpu-sim"}  # waited, not spilled
        assert d.calls("cpu-sim") == 0
        engine_rows = _count_calling(d.database_url)
        assert engine_rows == 0  # every slot given back


def _count_calling(url: str) -> int:
    from tierq.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                select(func.count()).select_from(Job).where(Job.calling_backend.is_not(None))
            )
    finally:
        engine.dispose()


def ramped_backend(urls: dict[str, str]) -> dict[str, Any]:
    return {
        "tiers": [
            tier(
                "gpu",
                backend("gpu-sim", "openai", urls["gpu-sim"], max_concurrency=4),
                breaker={"slow_start_seconds": 600},
            ),
        ]
    }


def _set_closed_at(url: str, seconds_ago: float) -> None:
    from sqlalchemy import update

    from tierq.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            changed = conn.execute(
                update(Backend)
                .where(Backend.name == "gpu-sim")
                .values(circuit="closed", closed_at=db_now(-seconds_ago))
            ).rowcount
    finally:
        engine.dispose()
    assert changed == 1


def _try_set_closed_at(url: str, seconds_ago: float) -> bool:
    try:
        _set_closed_at(url, seconds_ago)
    except AssertionError:
        return False
    return True


def _max_in_flight_of(d: Any, count: int) -> int:
    import httpx

    httpx.post(f"{d.simulators['gpu-sim']}/_sim/reset").raise_for_status()
    d.fault("gpu-sim", latency_ms=600)
    with d.client() as client:
        ids = [d.submit(client, f"question {uuid.uuid4()}").json()["id"] for _ in range(count)]
        done = [client.get(f"/v1/jobs/{i}", params={"wait": 40}).json() for i in ids]
    assert [j["status"] for j in done] == ["succeeded"] * count, done
    return httpx.get(f"{d.simulators['gpu-sim']}/_sim/stats").json()["max_in_flight"]


@pytest.mark.slow
def test_a_just_recovered_lone_backend_gets_ramped_traffic(tmp_path: Path) -> None:
    with deployment(tmp_path, config=ramped_backend, simulators=("gpu-sim",)) as d:
        d.stack.api()
        d.stack.relay()  # makes the backend rows
        d.stack.worker("gpu", calls=4)
        wait_until(lambda: _try_set_closed_at(d.database_url, 0), 20, 0.2, what="backend row")
        assert _max_in_flight_of(d, 4) == 1  # ramp at its floor: 0.1 x 4 rounds up to one
        _set_closed_at(d.database_url, 3600)  # the ramp is over: the full cap
        assert _max_in_flight_of(d, 4) > 1


# --- a call preparation that raises -------------------------------------------------------


def test_a_preparation_that_raises_fails_the_job_at_once_not_republished(
    env: dict[str, str], primary: RunningSimulator, secondary: RunningSimulator
) -> None:
    """The claim shares its transaction with the call's preparation, so an exception there
    rolls the claim back: nothing is left to expire, and the job would be republished
    forever. A row the worker cannot read (here a request that is not an object, as a bad
    migration might leave) fails at once with the reason: reading it again fails again.
    (A database error there is counted like a lost lease instead: it may pass.)"""
    config, gpu, _ = two_tiers(primary.url, secondary.url)
    job_id = queued_job(gpu)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(request=["not", "an", "object"]))
    calls_before = httpx.get(f"{primary.url}/_sim/stats").json()["total"]
    with pytest.raises(ValueError):
        runner(config).run(job_id, gpu)
    job = job_row(job_id)
    assert job.status == "failed" and job.lost_leases == 0, (job.status, job.error)
    assert (job.error or "").startswith("tierq could not prepare the call: ValueError at ")
    assert events_of(job_id) == ["failed"]  # the claim rolled back with its failure
    assert httpx.get(f"{primary.url}/_sim/stats").json()["total"] == calls_before


# --- a request that breaks tierq itself is its own problem ------------------------------
POISON = "poison-marker-7f3a"


def _breaks_on_poison(original: Any) -> Any:
    """``original``, but raising what no backend failure is (as encoding a request that
    cannot be sent would) when the request carries POISON."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        turns = [t.content for a in args if isinstance(a, list) for t in a if hasattr(t, "seq")]
        if POISON in repr(args) + repr(kwargs) + repr(turns):
            raise UnicodeEncodeError("utf-8", POISON, 0, 1, f"cannot encode {POISON}")
        return original(*args, **kwargs)

    return broken


@pytest.mark.parametrize("where", ["call", "preparation"])
def test_a_request_that_breaks_the_worker_fails_at_once_and_frees_its_slot(
    env: dict[str, str],
    primary: RunningSimulator,
    secondary: RunningSimulator,
    faults: SimulatorControl,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    import worker.runner
    from worker.backends.openai_compat import OpenAIClient

    if where == "call":
        monkeypatch.setattr(OpenAIClient, "body", _breaks_on_poison(OpenAIClient.body))
    else:
        monkeypatch.setattr(worker.runner, "build_request", _breaks_on_poison(
            worker.runner.build_request))  # fmt: skip
    config, gpu, _ = two_tiers(primary.url, secondary.url, max_concurrency=1)
    poison = queued_job(gpu, f"a question with {POISON} in it")
    # A failed preparation is raised on to Celery, after it was recorded.
    with caplog.at_level("DEBUG"), contextlib.suppress(UnicodeEncodeError):
        runner(config).run(poison, gpu)
    job = job_row(poison)
    assert job.status == "failed", (job.status, job.error)
    assert (job.error or "").startswith("tierq could not ") and "UnicodeEncodeError" in job.error
    assert POISON not in (job.error or "")
    assert job.calling_backend is None and job.lease_token is None
    assert POISON not in caplog.text, "a log line quotes the request"
    assert faults.received("POST /v1/chat/completions") == 0
    # Its one slot is free at once: the next job on the tier is answered, not kept waiting.
    other = queued_job(gpu, "an ordinary question")
    runner(config).run(other, gpu)
    assert job_row(other).status == "succeeded"
