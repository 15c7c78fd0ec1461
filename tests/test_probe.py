"""Health probes against the real simulator: ``probe`` is synchronous (the prober's thread
pool calls it) and runs the asynchronous backend client on an event loop of its own.

``probe_and_save`` reads the backend's shared state first (calls in flight, its last
answered call, breaker, last probe) and sends a canary only to a backend that is idle or
suspected: the tests below hold real calls in flight with an in-process worker."""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from simulator.control import SimulatorControl
from tests.services import wait_until
from tests.simulator_fixture import running_simulator
from tests.test_routing import backend_doc, config_of, queued_job, set_backend, tier_doc, unique
from tierq.config import BackendConfig, TierqConfig
from tierq.db import db_now, session_scope
from tierq.errors import ErrorClass
from tierq.models import Backend, Job
from tierq.settings import get_settings
from worker import circuit
from worker.calls import Calls
from worker.health import probe, probe_and_save
from worker.probe_policy import BackendState, ProbePlan, Send, busy_during, probe_plan, verdict
from worker.probe_store import read_state
from worker.runner import JobRunner

# The liveness probe is the model list: it also says which models the server serves.
LIVENESS = {"openai": "GET /v1/models", "ollama": "GET /api/tags", "anthropic": "GET /v1/models"}
CHAT = {
    "openai": "POST /v1/chat/completions",
    "ollama": "POST /api/chat",
    "anthropic": "POST /v1/messages",
}


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_simulator("sim-p") as url:
        yield url


@pytest.fixture
def control(sim_url: str) -> Iterator[SimulatorControl]:
    with SimulatorControl(sim_url) as ctl:
        ctl.reset()
        yield ctl


def backend(protocol: str, url: str, **overrides: Any) -> BackendConfig:
    fields: dict[str, Any] = {
        "name": f"p-{protocol}",
        "protocol": protocol,
        "url": url,
        "model": "m-1",
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
    }
    return BackendConfig(**(fields | overrides))


def test_probes_run_from_a_thread_pool_several_at_once(
    sim_url: str, control: SimulatorControl
) -> None:
    protocols = ["openai", "ollama", "anthropic"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(probe, [backend(p, sim_url) for p in protocols]))
    assert [(r.backend, r.health, r.error) for r in results] == [
        (f"p-{p}", "healthy", None) for p in protocols
    ]
    expected = {LIVENESS["openai"]: 2, LIVENESS["ollama"]: 1}  # openai and anthropic share it
    expected |= {CHAT[p]: 1 for p in protocols}  # the canary
    assert control.stats()["endpoints"] == expected


def test_a_paid_backend_gets_no_canary(sim_url: str, control: SimulatorControl) -> None:
    result = probe(backend("anthropic", sim_url, paid=True))
    assert result.health == "healthy"
    assert control.stats()["endpoints"] == {LIVENESS["anthropic"]: 1}


def test_a_failing_backend_is_down(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="overloaded")
    result = probe(backend("openai", sim_url))
    assert result.health == "down"
    assert result.error is not None and result.error.startswith("overloaded: p-openai: HTTP 503")
    control.set_faults(mode="error_500", scope="chat")  # up, but its canary fails
    result = probe(backend("ollama", sim_url))
    assert result.health == "down"
    assert result.error is not None and result.error.startswith("server: p-ollama: HTTP 500")


def test_a_slow_backend_is_degraded(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(latency_ms=60)
    result = probe(backend("openai", sim_url, health={"degraded_latency_ms": 50}))
    assert (result.health, result.error) == ("degraded", None)
    assert result.latency_ms >= 120  # liveness and canary, 60 ms each


def test_the_model_list_says_what_is_served_and_a_mismatch_is_reported_not_down(
    sim_url: str, control: SimulatorControl
) -> None:
    # The simulator serves one model named after its instance; Ollama tags it ":latest".
    result = probe(backend("ollama", sim_url, model="sim-p"))
    assert (result.health, result.served_models, result.model_error) == (
        "healthy",
        ["sim-p:latest"],
        None,
    )
    result = probe(backend("anthropic", sim_url, model="llama3"))
    assert (result.health, result.served_models) == ("healthy", ["sim-p"])
    assert result.model_error == "serves [sim-p], not 'llama3'"


def test_a_model_list_that_cannot_be_read_leaves_the_models_unknown(
    sim_url: str, control: SimulatorControl
) -> None:
    control.set_faults(mode="wrong_shape", count=1)  # the model list only; the canary answers
    result = probe(backend("openai", sim_url, model="sim-p"))
    assert (result.health, result.error, result.listed) == ("healthy", None, True)
    assert (result.served_models, result.model_error) == (None, None)
    assert control.received(CHAT["openai"]) == 1


# --- what a probe sends, with the backend's shared state from the database ----------------


@functools.cache
def _calls() -> Calls:
    return Calls()  # one call loop for the test process, as a worker process has


def one_backend(url: str, **options: Any) -> tuple[TierqConfig, str, BackendConfig]:
    """A tier of one backend on the simulator (fresh names), with its row."""
    tier, name = unique("probe"), unique("b")
    config = config_of(tier_doc(tier, backend_doc(name, url, model="sim-p", **options)))
    with session_scope() as session:
        circuit.ensure_rows(session, config)
    return config, tier, config.backends[name]


def run_job(config: TierqConfig, tier: str) -> uuid.UUID:
    job_id = queued_job(tier)
    JobRunner(config, get_settings(), unique("w"), _calls()).run(job_id, tier)
    return job_id


def start_job(config: TierqConfig, tier: str) -> tuple[threading.Thread, uuid.UUID]:
    """A real call in flight: an in-process worker runs a job on its own thread."""
    job_id = queued_job(tier)
    worker = JobRunner(config, get_settings(), unique("w"), _calls())
    thread = threading.Thread(target=worker.run, args=(job_id, tier), daemon=True)
    thread.start()
    return thread, job_id


def in_flight(name: str) -> int:
    return read_state(name, 30).in_flight


def row(name: str) -> Backend:
    with session_scope() as session:
        return session.get_one(Backend, name)


def job_status(job_id: uuid.UUID) -> str:
    with session_scope() as session:
        return session.get_one(Job, job_id).status


def test_a_busy_single_slot_backend_under_probes_is_not_marked_down(
    env: dict[str, str], sim_url: str, control: SimulatorControl
) -> None:
    # llama.cpp answers one request at a time, and any other request ends the stream it is
    # generating: a backend with a call in flight is sent nothing; its call is the probe.
    control.set_faults(latency_ms=3000)
    health = {"interval": 0.3, "degraded_latency_ms": 100}
    config, tier, slot = one_backend(sim_url, max_concurrency=1, health=health)
    set_backend(slot.name, health="healthy")
    call, job_id = start_job(config, tier)
    wait_until(lambda: in_flight(slot.name) == 1, 5, what="the job's call in flight")
    results = [probe_and_save(slot) for _ in range(3)]
    assert in_flight(slot.name) == 1, "the call ended before the probes did"
    assert row(slot.name).health == "healthy"
    assert control.received(CHAT["openai"]) == 1, "a canary queued behind the call"
    assert control.received(LIVENESS["openai"]) == 0, "a request beside the call"
    for result in results:
        assert result is not None and (result.sent, result.health) == ("nothing", None)
    call.join(10)
    assert job_status(job_id) == "succeeded"


def test_a_call_that_starts_during_an_idle_backends_canary_excuses_its_timeout(
    env: dict[str, str], sim_url: str, control: SimulatorControl
) -> None:
    control.set_faults(latency_ms=2000)  # probes are bounded at 1 s
    health = {"interval": 1.0, "degraded_latency_ms": 100}
    config, tier, slot = one_backend(sim_url, max_concurrency=1, health=health)
    set_backend(slot.name, health="healthy")
    with ThreadPoolExecutor(max_workers=1) as pool:
        probing = pool.submit(probe_and_save, slot)
        wait_until(lambda: control.received(LIVENESS["openai"]) == 1, 5, what="the probe sent")
        call, _ = start_job(config, tier)
        wait_until(lambda: in_flight(slot.name) == 1, 5, what="the job's call in flight")
        result = probing.result(10)
    assert row(slot.name).health == "healthy"
    assert result is not None and (result.sent, result.health) == ("canary", None), result
    call.join(10)


def test_an_answered_call_spares_the_canary_until_the_backend_is_idle_an_interval(
    env: dict[str, str], sim_url: str, control: SimulatorControl
) -> None:
    config, tier, answering = one_backend(sim_url, health={"interval": 1.0})
    control.set_faults(mode="bad_request", count=1)  # rejected: the server answered no call
    run_job(config, tier)
    assert row(answering.name).last_answer_at is None
    assert job_status(run_job(config, tier)) == "succeeded"
    assert row(answering.name).last_answer_at is not None
    control.reset_stats()
    result = probe_and_save(answering)
    assert result is not None and result.health == "healthy"
    assert control.stats()["endpoints"] == {LIVENESS["openai"]: 1}, "a canary was sent"
    wait_until(lambda: read_state(answering.name, 30).answered_ago > 1.0, 5, what="an interval")
    result = probe_and_save(answering)
    assert result is not None and result.health == "healthy"
    assert control.stats()["endpoints"] == {LIVENESS["openai"]: 2, CHAT["openai"]: 1}


@pytest.mark.parametrize(
    "suspicion",
    [
        {"circuit": "half_open"},
        {"window_failures": 2, "window_started_at": db_now()},
        {"health": "down"},
    ],
    ids=["breaker-half-open", "failed-calls", "probed-down"],
)
def test_a_suspected_backend_gets_a_canary_even_right_after_an_answer(
    env: dict[str, str], sim_url: str, control: SimulatorControl, suspicion: dict[str, Any]
) -> None:
    _, _, suspect = one_backend(sim_url)
    set_backend(suspect.name, health="healthy", last_answer_at=db_now())
    probe_and_save(suspect)
    assert control.received(CHAT["openai"]) == 0, "a canary after a recent answer"
    set_backend(suspect.name, **suspicion)
    result = probe_and_save(suspect)
    assert control.received(CHAT["openai"]) == 1, "no canary to a suspected backend"
    assert result is not None and result.health == "healthy"
    assert row(suspect.name).health == "healthy"


# --- the pure decisions ------------------------------------------------------------------

IDLE = BackendState(health="healthy")
PLAN_CANARY = ProbePlan(Send.CANARY, "idle")
PLAN_MODELS = ProbePlan(Send.MODELS, "busy")


@pytest.mark.parametrize(
    ("state", "options", "sent"),
    [
        (IDLE, {}, "canary"),
        (BackendState(), {}, "canary"),  # never probed: idle, not suspected
        (replace(IDLE, in_flight=1), {}, "nothing"),  # a request beside it ends a llama stream
        (replace(IDLE, in_flight=1), {"paid": True}, "nothing"),
        (replace(IDLE, answered_ago=4.0), {}, "models"),  # within the 5 s interval
        (replace(IDLE, answered_ago=6.0), {}, "canary"),
        (replace(IDLE, in_flight=3, circuit="open"), {}, "nothing"),  # its calls will tell
        (replace(IDLE, in_flight=1, answered_ago=0.1, health="down"), {}, "nothing"),
        (replace(IDLE, circuit="open"), {}, "canary"),
        (replace(IDLE, answered_ago=0.1, health="down"), {}, "canary"),
        (replace(IDLE, answered_ago=0.1, recent_failures=1), {}, "canary"),
        (replace(IDLE, circuit="half_open"), {"paid": True}, "models"),
        (IDLE, {"health": {"canary": False}}, "models"),
    ],
)
def test_probe_plan(state: BackendState, options: dict[str, Any], sent: str) -> None:
    assert probe_plan(backend("openai", "http://127.0.0.1:9", **options), state).send == sent


@pytest.mark.parametrize(
    ("failure", "busy", "health"),
    [
        (ErrorClass.TIMEOUT, 1, None),
        (ErrorClass.OVERLOADED, 2, None),
        (ErrorClass.RATE_LIMITED, 1, None),
        (ErrorClass.TIMEOUT, 0, "down"),
        (ErrorClass.CONNECT, 1, "down"),  # busy servers accept connections
        (ErrorClass.SERVER, 1, "down"),
    ],
)
def test_only_a_busy_backends_timeout_or_overload_is_not_counted(
    failure: ErrorClass, busy: int, health: str | None
) -> None:
    found = verdict(
        backend("openai", "http://x"), PLAN_CANARY, "healthy", 10.0, (failure, "e"), busy
    )
    assert found.health == health


def test_a_model_list_does_not_clear_a_slow_canary_but_measures_a_paid_backend() -> None:
    free, paid = backend("openai", "http://x"), backend("openai", "http://x", paid=True)
    assert verdict(free, PLAN_MODELS, "degraded", 10.0, None, 1).health == "degraded"
    assert verdict(free, PLAN_CANARY, "degraded", 10.0, None, 0).health == "healthy"
    assert verdict(paid, PLAN_MODELS, "degraded", 10.0, None, 0).health == "healthy"
    assert verdict(free, PLAN_CANARY, "healthy", 2500.0, None, 0).health == "degraded"


def test_a_call_answered_while_the_probe_ran_makes_it_busy() -> None:
    before = BackendState()
    assert busy_during(before, BackendState(answered_ago=0.5), probe_seconds=1.0) == 1
    assert busy_during(before, BackendState(answered_ago=5.0), probe_seconds=1.0) == 0
    assert busy_during(before, BackendState(in_flight=2), probe_seconds=1.0) == 2
    assert busy_during(replace(before, in_flight=1), before, probe_seconds=1.0) == 1
