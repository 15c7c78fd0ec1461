"""The failover engine against the simulator, real Postgres, real Redis and real workers:
every way the primary fails ends on the right tier with the right quality, and the
attempt rows tell the story."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from simulator.control import SimulatorControl
from tests.deployment import Deployment, backend, deployment, tier, two_tiers
from tests.services import free_port, wait_until
from tierq.db import make_engine
from tierq.keys import create_key
from tierq.models import Attempt, CircuitTransition, Job, JobEvent

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NEVER_OPENS = {"min_calls": 10_000}  # for tests about routing, not about breakers


# -- helpers ----------------------------------------------------------------------------
def rows(d: Deployment, query: Any) -> list[Any]:
    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query).all())
    finally:
        engine.dispose()


def attempts(d: Deployment, job_id: str) -> list[tuple[str, str, str | None]]:
    found = rows(
        d,
        select(Attempt.backend, Attempt.outcome, Attempt.error_class)
        .where(Attempt.job_id == uuid.UUID(job_id))
        .order_by(Attempt.id),
    )
    return [tuple(r) for r in found]


def transitions(d: Deployment, backend_name: str) -> list[tuple[str, str]]:
    found = rows(
        d,
        select(CircuitTransition.from_state, CircuitTransition.to_state)
        .where(CircuitTransition.backend == backend_name)
        .order_by(CircuitTransition.id),
    )
    return [(r[0], r[1]) for r in found]


def wait_job(client: httpx.Client, job_id: str, wait: float = 30) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", params={"wait": wait}).json()


def run_jobs(d: Deployment, count: int, wait: float = 30, **extra: Any) -> list[dict[str, Any]]:
    """Submit ``count`` jobs at once, then wait for each to end."""
    with d.client() as client:
        ids = [d.submit(client, f"question {i}", **extra).json()["id"] for i in range(count)]
        return [wait_job(client, i, wait) for i in ids]


def ask(d: Deployment, content: str, **extra: Any) -> dict[str, Any]:
    with d.client() as client:
        submitted = d.submit(client, content, **extra)
        assert submitted.status_code == 202, submitted.text
        return wait_job(client, submitted.json()["id"])


def status_of(d: Deployment, job_id: str) -> str:
    with d.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()["status"]


def content_of(job: dict[str, Any]) -> str:
    return job["result"]["choices"][0]["message"]["content"]


def start(d: Deployment, *tiers: str, beat: bool = False) -> None:
    d.stack.api()
    d.stack.spawn("beat", "beat") if beat else d.stack.relay()
    for name in tiers:
        d.stack.worker(name)


def sim(d: Deployment, name: str) -> SimulatorControl:
    return SimulatorControl(d.simulators[name])


def chat_requests(d: Deployment, name: str) -> list[dict[str, Any]]:
    """What the simulator received on its chat endpoints, oldest first."""
    with sim(d, name) as control:
        return [r for r in control.requests() if r["endpoint"].startswith("POST ")]


def admin_headers(d: Deployment) -> dict[str, str]:
    engine = make_engine(d.database_url)
    try:
        with Session(engine) as session, session.begin():
            key = create_key(session, "ops", is_admin=True).key
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


def set_disabled(d: Deployment, headers: dict[str, str], name: str, disabled: bool) -> None:
    action = "disable" if disabled else "enable"
    answer = httpx.post(f"{d.stack.api_url}/v1/admin/backends/{name}/{action}", headers=headers)
    assert answer.status_code == 200 and answer.json()["disabled"] is disabled, answer.text


# -- each failure mode of the primary ---------------------------------------------------
def slow_primary(urls: dict[str, str]) -> dict[str, Any]:
    config = two_tiers(urls)
    config["tiers"][0]["backends"][0]["read_timeout"] = 1
    # One deployment serves every failure mode below: its breaker must not open on the
    # failures of the modes before, nor its retry budget run out.
    config["tiers"][0]["breaker"] = NEVER_OPENS
    config["tiers"][0]["retry"] = {"attempts": 2, "base_delay": 0.05, "max_delay": 0.2, "budget": 1}
    return config


@pytest.fixture(scope="class")
def primary_fails(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("primary-fails"), config=slow_primary) as d:
        start(d, "gpu", "cpu")
        yield d


class TestPrimaryFailureModes:
    """Every way the primary fails, on one deployment (its breaker never opens)."""

    @pytest.mark.parametrize(
        ("faults", "error_class"),
        [
            ({"mode": "error_500"}, "server"),
            ({"mode": "overloaded"}, "overloaded"),
            ({"mode": "rate_limit", "retry_after": 0.5}, "rate_limited"),
            ({"mode": "malformed"}, "malformed"),
            ({"mode": "reset"}, "connect"),
            ({"mode": "hang"}, "timeout"),
            ({"latency_ms": 3000}, "timeout"),  # slow past the 1 s read timeout
        ],
    )
    def test_ends_on_the_cpu_tier(
        self, primary_fails: Deployment, faults: dict, error_class: str
    ) -> None:
        d = primary_fails
        d.fault("gpu-sim", **faults)
        for job in run_jobs(d, 2):
            assert job["status"] == "succeeded", job
            assert job["served_by"]["tier"] == "cpu" and job["served_by"]["quality"] == "reduced"
            assert job["served_by"]["backend"] == "cpu-sim"
            assert "cpu-sim" in content_of(job)
            story = attempts(d, job["id"])
            assert story[-1] == ("cpu-sim", "ok", None)
            assert all(a == ("gpu-sim", "error", error_class) for a in story[:-1]), story
            assert 1 <= len(story) - 1 <= 2  # tried the primary, retried at most its budget


@contextmanager
def simulator_process(name: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A simulator in a process of its own, so a test can SIGKILL it like a crashed server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", f"{name}:{port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answering() -> bool:
            try:
                return httpx.get(f"{url}/_sim/state", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answering, 20, 0.05, what=f"simulator {name} up")
        yield url, process
    finally:
        process.kill()
        process.wait(10)


def test_primary_killed_under_load_fails_over_at_once(tmp_path: Path) -> None:
    with simulator_process("gpu-sim") as (gpu_url, gpu_process):

        def config(urls: dict[str, str]) -> dict[str, Any]:
            return {
                "tiers": [
                    # A breaker that stays closed, so every job after the kill meets
                    # the refused connection itself.
                    tier("gpu", backend("gpu-sim", "openai", gpu_url), breaker=NEVER_OPENS),
                    tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"])),
                ]
            }

        with deployment(tmp_path, config=config, simulators=("cpu-sim",)) as d:
            start(d, "gpu", "cpu")
            connect_timeout_ms = backend("x", "openai", gpu_url)["connect_timeout"] * 1000
            # Slow answers, so calls are in flight on the primary when it dies.
            httpx.put(f"{gpu_url}/_sim/faults", json={"latency_ms": 400}).raise_for_status()
            with d.client() as client:
                before = [d.submit(client, f"before {i}").json()["id"] for i in range(10)]
                assert wait_job(client, before[0])["served_by"]["tier"] == "gpu"

                def primary_busy() -> bool:
                    return httpx.get(f"{gpu_url}/_sim/stats").json()["in_flight"] > 0

                wait_until(primary_busy, 10, 0.02, what="a call in flight on the primary")
                gpu_process.send_signal(signal.SIGKILL)
                gpu_process.wait(10)
                after = [d.submit(client, f"after {i}").json()["id"] for i in range(6)]
                done = {i: wait_job(client, i) for i in before + after}
            assert all(job["status"] == "succeeded" for job in done.values()), done
            cut = [i for i in before if done[i]["served_by"]["tier"] == "cpu"]
            assert cut, "no call was cut by the kill"
            for job_id in cut + after:
                served = done[job_id]["served_by"]
                assert (served["tier"], served["backend"], served["quality"]) == (
                    "cpu",
                    "cpu-sim",
                    "reduced",
                )
                story = attempts(d, job_id)
                assert story[-1] == ("cpu-sim", "ok", None)
                assert {a[:2] for a in story[:-1]} <= {("gpu-sim", "error")}
                assert {a[2] for a in story[:-1]} <= {"connect"}, story
            for job_id in after:  # refused, at once on to the next tier
                assert attempts(d, job_id) == [
                    ("gpu-sim", "error", "connect"),
                    ("cpu-sim", "ok", None),
                ]
            for job_id in before:
                if job_id not in cut:
                    assert done[job_id]["served_by"]["quality"] == "full"
            # A refused connection costs no timeout: the calls after the kill failed at once.
            refused = rows(
                d,
                select(Attempt.latency_ms).where(
                    Attempt.job_id.in_([uuid.UUID(i) for i in after]),
                    Attempt.backend == "gpu-sim",
                ),
            )
            assert len(refused) == len(after), refused
            assert all(r[0] < connect_timeout_ms for r in refused), refused
            assert d.ledger().answered_twice == 0


# -- the breaker, shared by two worker processes ----------------------------------------
BREAKER = {
    "window_seconds": 60,
    "min_calls": 4,
    "failure_rate": 0.5,
    "recovery_timeout": 3,
    "half_open_successes": 3,
    "slow_start_seconds": 0,
}


def breaker_config(urls: dict[str, str]) -> dict[str, Any]:
    config = two_tiers(urls)
    config["tiers"][0]["breaker"] = dict(BREAKER)
    config["tiers"][0]["retry"] = {"attempts": 1}
    return config


def calls_by_worker(d: Deployment, backend_name: str) -> dict[str, int]:
    found = rows(d, select(Attempt.worker).where(Attempt.backend == backend_name))
    counts: dict[str, int] = {}
    for (worker,) in found:
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def claims_by_worker(d: Deployment, tier_name: str) -> dict[str, int]:
    found = rows(d, select(JobEvent.detail).where(JobEvent.kind == "claimed"))
    counts: dict[str, int] = {}
    for (detail,) in found:
        if detail.get("tier") == tier_name:
            counts[detail["worker"]] = counts.get(detail["worker"], 0) + 1
    return counts


def test_breaker_opens_half_opens_and_closes_across_two_workers(tmp_path: Path) -> None:
    gpu_slots = 2  # two worker processes of one slot each
    min_calls, recovery = BREAKER["min_calls"], BREAKER["recovery_timeout"]
    with deployment(tmp_path, config=breaker_config) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu", calls=1)
        d.stack.worker("gpu", calls=1)
        d.stack.worker("cpu")
        gpu = sim(d, "gpu-sim")

        # CLOSED → OPEN. A shared breaker opens after min_calls failures, whoever made
        # them; calls already in flight on the other slots are the only slack. Breakers
        # per process would let each process make min_calls calls of its own.
        gpu.set_faults(mode="error_500")
        assert all(j["served_by"]["tier"] == "cpu" for j in run_jobs(d, 12))
        assert transitions(d, "gpu-sim") == [("closed", "open")]
        failing_calls = gpu.received()
        assert min_calls <= failing_calls <= min_calls + gpu_slots - 1, failing_calls
        calls, claims = calls_by_worker(d, "gpu-sim"), claims_by_worker(d, "gpu")
        assert len(claims) == 2, claims  # both processes took primary-tier jobs
        assert any(calls.get(w, 0) < min_calls and claims[w] > calls.get(w, 0) for w in claims), (
            calls,
            claims,
        )  # a process skipped the primary on failures another one saw

        # OPEN → HALF_OPEN: one trial at a time, however many jobs arrive at once.
        gpu.set_faults(latency_ms=1000)  # a slow trial, so concurrent jobs overlap it
        time.sleep(recovery + 0.3)
        gpu.reset_stats()
        trial_round = run_jobs(d, 3)
        assert gpu.stats()["max_in_flight"] == 1
        tiers = [j["served_by"]["tier"] for j in trial_round]
        assert tiers.count("gpu") == gpu.received() >= 1, tiers
        assert "cpu" in tiers  # a job that found the trial taken went on at once
        assert transitions(d, "gpu-sim")[-1] == ("open", "half_open")

        # HALF_OPEN → OPEN on a failed trial.
        gpu.set_faults(mode="error_500")
        [failed_trial] = run_jobs(d, 1)
        assert failed_trial["served_by"]["tier"] == "cpu"
        assert transitions(d, "gpu-sim")[-1] == ("half_open", "open")

        # OPEN → HALF_OPEN → CLOSED after half_open_successes trials, one at a time.
        gpu.set_faults(mode="ok")
        time.sleep(recovery + 0.3)
        done = [run_jobs(d, 1)[0] for _ in range(BREAKER["half_open_successes"] + 1)]
        assert [j["served_by"]["tier"] for j in done] == ["gpu"] * len(done), done
        assert transitions(d, "gpu-sim") == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        reasons = rows(
            d,
            select(CircuitTransition.reason)
            .where(CircuitTransition.backend == "gpu-sim")
            .order_by(CircuitTransition.id),
        )
        assert "trial call failed" in reasons[2][0]


# -- all tiers down: park, fail past the deadline, replay paced and in order -------------
REPLAY_RATE = 4


def parking_config(urls: dict[str, str]) -> dict[str, Any]:
    config = breaker_config(urls)
    config["tiers"][1]["breaker"] = config["tiers"][0]["breaker"]
    config["tiers"][1]["retry"] = {"attempts": 1}
    for t in config["tiers"]:
        t["backends"][0]["health"] = {"interval": 0.5, "canary": False}
    config["emergency"] = {"retry_after": 30, "replay_rate": REPLAY_RATE}
    return config


def most_in_one_second(times: list[float]) -> int:
    """The largest number of the (sorted) times that fall in any window of one second."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def over_the_bucket(times: list[float], rate: float, burst: float) -> tuple[int, int] | None:
    """A run of releases (first, last index) more than a token bucket lets through: at most
    burst + rate x elapsed. The slack covers the relay reading its clock a moment before
    the database stamps the release."""
    slack = 0.05
    for first, t0 in enumerate(times):
        for last in range(first, len(times)):
            if last - first + 1 > burst + rate * (times[last] - t0 + slack):
                return first, last
    return None


def test_all_tiers_down_park_then_replay_at_the_configured_rate(tmp_path: Path) -> None:
    priorities = [0, 10, -5, 10, 0, 50, -5, 0, 50, 10, 0, -5]
    with deployment(tmp_path, config=parking_config) as d:
        start(d, "gpu", "cpu", beat=True)
        for name in ("gpu-sim", "cpu-sim"):
            d.fault(name, mode="error_500")
        deadline = datetime.now(UTC) + timedelta(seconds=6)
        with d.client() as client:
            late = d.submit(client, "too late", deadline=deadline.isoformat()).json()["id"]
            ids = [
                d.submit(client, f"during the outage {i}", priority=p).json()["id"]
                for i, p in enumerate(priorities)
            ]
            no_wait = d.submit(client, "fail rather than wait", on_exhausted="fail").json()
            assert wait_job(client, no_wait["id"])["status"] == "failed"  # config says park
            wait_until(
                lambda: all(status_of(d, i) == "parked" for i in [late, *ids]),
                40,
                0.3,
                what="every job parked",
            )
            assert datetime.now(UTC) < deadline, "parking took longer than the test allows"
            parked = client.get(f"/v1/jobs/{ids[0]}").json()
            assert parked["retry_after"] and "unavailable" in parked["error"]
            wait_until(
                lambda: status_of(d, late) == "failed",
                (deadline - datetime.now(UTC)).total_seconds() + 5,
                0.3,
                what="the parked job past its deadline to fail",
            )
            assert "deadline" in client.get(f"/v1/jobs/{late}").json()["error"]
            assert all(status_of(d, i) == "parked" for i in ids)  # still waiting
            assert "every tier failed" in wait_job(client, no_wait["id"])["error"]
        for name in ("gpu-sim", "cpu-sim"):
            d.fault(name, mode="ok")
        result = d.wait_finished(60)
        assert result.statuses == {"succeeded": 12, "failed": 2}, result
        assert result.answered_twice == 0 and result.mismatched == 0, result

        # Every parked job was released once and answered once; the others never were.
        assert d.events("replayed") == {i: 1 for i in ids}
        assert d.events("answered") == {i: 1 for i in ids}
        assert d.events("parked").keys() == {late, *ids}

        releases = rows(
            d,
            select(JobEvent.created_at, Job.priority, Job.created_at)
            .join(Job, Job.id == JobEvent.job_id)
            .where(JobEvent.kind == "replayed")
            .order_by(JobEvent.created_at),
        )
        # Paced: a token bucket of one second's worth lets at most rate + burst through
        # in any one second; all twelve at once would be 12.
        burst = max(REPLAY_RATE, 1)
        times = [r[0].timestamp() for r in releases]
        assert most_in_one_second(times) <= REPLAY_RATE + burst, times
        assert over_the_bucket(times, REPLAY_RATE, burst) is None, times
        # Highest priority first, then oldest: every job released in an earlier sweep
        # comes before every job released in a later one.
        sweeps: dict[float, list[tuple[int, float]]] = {}
        for released_at, priority, created in releases:
            sweeps.setdefault(released_at.timestamp(), []).append((-priority, created.timestamp()))
        ordered = [sweeps[t] for t in sorted(sweeps)]
        for earlier, later in itertools.pairwise(ordered):
            assert max(earlier) < min(later), ordered


# -- operator controls: a disabled backend receives nothing, not even probes -----------
def probed_config(urls: dict[str, str]) -> dict[str, Any]:
    config = two_tiers(urls)
    for t in config["tiers"]:
        t["backends"][0]["health"] = {"interval": 0.5}  # liveness and canary
    return config


def test_disabled_backend_receives_no_call_not_even_a_probe(tmp_path: Path) -> None:
    with deployment(tmp_path, config=probed_config) as d:
        d.stack.api()
        headers = admin_headers(d)
        denied = httpx.post(
            f"{d.stack.api_url}/v1/admin/backends/gpu-sim/disable",
            headers={"Authorization": f"Bearer {d.key}"},
        )
        assert denied.status_code == 403
        set_disabled(d, headers, "gpu-sim", True)
        d.stack.spawn("beat", "beat")
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        jobs = run_jobs(d, 5)
        assert all(j["served_by"]["backend"] == "cpu-sim" for j in jobs)
        probes = "GET /api/tags"  # Ollama's model list: the liveness probe
        wait_until(lambda: sim(d, "cpu-sim").received(probes) >= 3, 10, 0.2, what="cpu probes")
        assert d.calls("gpu-sim") == 0, sim(d, "gpu-sim").stats()
        set_disabled(d, headers, "gpu-sim", False)
        assert run_jobs(d, 1)[0]["served_by"]["backend"] == "gpu-sim"
        wait_until(
            lambda: sim(d, "gpu-sim").received("GET /v1/models") > 0,
            10,
            0.2,
            what="probes of the enabled backend again",
        )
        unknown = httpx.post(f"{d.stack.api_url}/v1/admin/backends/nope/disable", headers=headers)
        assert unknown.status_code == 404


# -- the minimal tier -------------------------------------------------------------------
def minimal_config(urls: dict[str, str]) -> dict[str, Any]:
    config = breaker_config(urls)
    config["tiers"] = config["tiers"][:1]
    config["minimal"] = {
        "cache_max_age": 600,
        "rules": "tests.rules_responder:opening_hours",
        "static_message": "Sorry, the assistant is down.",
    }
    config["on_exhausted"] = "degrade"
    return config


def test_minimal_tier_answers_cached_then_rules_then_static(tmp_path: Path) -> None:
    with deployment(tmp_path, config=minimal_config) as d:
        start(d, "gpu")
        fresh = ask(d, "what is   tierq?")
        assert fresh["served_by"]["quality"] == "full"
        d.fault("gpu-sim", mode="error_500")
        cached = ask(d, "what is tierq?")  # the same question, whitespace aside
        rules = ask(d, "what are your opening hours?")
        static = ask(d, "something nobody asked before")
        assert cached["served_by"]["quality"] == "cached"
        assert content_of(cached) == content_of(fresh)
        assert cached["served_by"]["backend"] == fresh["id"]  # which answer it reused
        assert rules["served_by"]["quality"] == "rules"
        assert content_of(rules) == "We are open 9 to 5."
        assert static["served_by"]["quality"] == "static"
        assert content_of(static).startswith("Sorry")


# -- three tiers, three protocols: one deployment for the tests below -------------------
RETRY_AFTER = 1.5  # seconds, sent by the simulator as retry-after-ms (Retry-After: 2)
GPU_RETRY = {"attempts": 2, "base_delay": 0.05, "max_delay": 5, "budget": 1.0}
CPU_DEGRADE = {"max_tokens": 5, "temperature": 0, "notice": "Answered by a smaller model."}
HOSTED_DEGRADE = {"max_tokens": 3, "temperature": 0, "model": "hosted-small"}
STATIC = "Sorry, every model is down."
WINDOW = 64  # gpu-sim's context_window, in tokens


def three_tiers(urls: dict[str, str]) -> dict[str, Any]:
    return {
        "tiers": [
            tier(
                "gpu",
                backend(
                    "gpu-sim",
                    "openai",
                    urls["gpu-sim"],
                    larger_context="big-sim",
                    context_window=WINDOW,
                ),
                retry=GPU_RETRY,
                breaker=NEVER_OPENS,
            ),
            tier(
                "cpu",
                backend("cpu-sim", "ollama", urls["cpu-sim"]),
                retry={"attempts": 1},
                breaker=NEVER_OPENS,
                degrade=CPU_DEGRADE,
            ),
            tier(
                "hosted",
                backend("big-sim", "anthropic", urls["big-sim"]),
                retry={"attempts": 1},
                breaker=NEVER_OPENS,
                degrade=HOSTED_DEGRADE,
            ),
        ],
        "minimal": {"static_message": STATIC},
        "on_exhausted": "fail",
    }


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("three-tiers")
    with deployment(folder, config=three_tiers, simulators=("gpu-sim", "cpu-sim", "big-sim")) as d:
        start(d, "gpu", "cpu", "hosted")
        yield d


@pytest.fixture(scope="module")
def admin3(three: Deployment) -> dict[str, str]:
    return admin_headers(three)


@pytest.fixture
def d3(three: Deployment, admin3: dict[str, str]) -> Deployment:
    """The shared three-tier deployment with every simulator healthy and every backend on."""
    for name in three.simulators:
        with sim(three, name) as control:
            control.reset()
        set_disabled(three, admin3, name, False)
    return three


def test_context_length_goes_straight_to_the_larger_backend(d3: Deployment) -> None:
    d3.fault("gpu-sim", max_context_words=3)
    job = ask(d3, "this question is far too long for the small model")
    assert job["status"] == "succeeded", job
    assert job["served_by"]["backend"] == "big-sim"
    assert attempts(d3, job["id"]) == [
        ("gpu-sim", "error", "context_length"),
        ("big-sim", "ok", None),
    ]
    assert d3.calls("cpu-sim") == 0  # skipped the tier in between


def test_a_prompt_over_the_context_window_is_not_sent_there(d3: Deployment) -> None:
    """Over the configured window by the lower bound of its tokens (bytes / 8): refused
    before the call, as the server would refuse it, and sent to the larger backend."""
    job = ask(d3, "word " * (WINDOW * 8 // 5 + 10))
    assert job["status"] == "succeeded" and job["served_by"]["backend"] == "big-sim", job
    [(backend, outcome, error_class)] = attempts(d3, job["id"])[:1]
    assert (backend, outcome, error_class) == ("gpu-sim", "error", "context_length")
    assert d3.calls("gpu-sim") == 0  # nothing was sent to it
    short = ask(d3, "word " * (WINDOW * 8 // 5 - 10))  # may fit: it is sent
    assert short["served_by"]["backend"] == "gpu-sim", short


def test_context_length_without_a_larger_backend_fails(
    d3: Deployment, admin3: dict[str, str]
) -> None:
    set_disabled(d3, admin3, "gpu-sim", True)
    d3.fault("cpu-sim", mode="context_length")  # cpu-sim names no larger backend
    job = ask(d3, "a question")
    assert job["status"] == "failed" and "context" in job["error"]
    assert attempts(d3, job["id"]) == [("cpu-sim", "error", "context_length")]
    assert d3.calls("big-sim") == 0


@pytest.mark.parametrize(
    ("target", "skipped"),
    [("gpu-sim", ()), ("cpu-sim", ("gpu-sim",)), ("big-sim", ("gpu-sim", "cpu-sim"))],
    ids=["openai", "ollama", "anthropic"],
)
def test_other_client_errors_fail_at_once_with_the_backends_reason(
    d3: Deployment, admin3: dict[str, str], target: str, skipped: tuple[str, ...]
) -> None:
    reason = f"temperature: {target} accepts at most 1"
    for name in skipped:
        set_disabled(d3, admin3, name, True)
    d3.fault(target, mode="bad_request", error_message=reason)
    job = ask(d3, "a question", temperature=1.5)
    assert job["status"] == "failed", job
    assert reason in job["error"] and target in job["error"]
    assert job["served_by"]["attempts"] == 1
    assert attempts(d3, job["id"]) == [(target, "error", "client")]
    assert len(chat_requests(d3, target)) == 1  # retrying cannot help: no second call
    others = [n for n in d3.simulators if n != target]
    assert all(d3.calls(n) == 0 for n in others)


def test_rate_limited_retry_waits_the_retry_after(d3: Deployment) -> None:
    # The first retry's jitter is at most base_delay: far below Retry-After, so only
    # honouring Retry-After can explain the gap.
    jitter_bound = min(GPU_RETRY["max_delay"], GPU_RETRY["base_delay"])
    assert jitter_bound + 1 < RETRY_AFTER <= GPU_RETRY["max_delay"]  # worth waiting for
    d3.fault("gpu-sim", mode="rate_limit", retry_after=RETRY_AFTER, count=1)
    job = ask(d3, "a question")
    assert job["served_by"]["tier"] == "gpu" and job["served_by"]["quality"] == "full", job
    assert attempts(d3, job["id"]) == [
        ("gpu-sim", "error", "rate_limited"),
        ("gpu-sim", "ok", None),
    ]
    first, second = chat_requests(d3, "gpu-sim")
    assert first["fault"] == "rate_limit" and second["fault"] == "ok"
    assert second["at"] - first["at"] >= RETRY_AFTER - 0.05, (first["at"], second["at"])


def test_retry_after_beyond_the_tiers_max_delay_escalates(d3: Deployment) -> None:
    d3.fault("gpu-sim", mode="rate_limit", retry_after=GPU_RETRY["max_delay"] * 4, count=1)
    started = time.monotonic()
    job = ask(d3, "a question")
    assert job["served_by"]["tier"] == "cpu", job
    assert attempts(d3, job["id"]) == [
        ("gpu-sim", "error", "rate_limited"),
        ("cpu-sim", "ok", None),
    ]
    assert time.monotonic() - started < GPU_RETRY["max_delay"]


def test_escalated_jobs_carry_the_next_tiers_degradation(d3: Deployment) -> None:
    d3.fault("gpu-sim", mode="error_500")
    long_answer = ask(d3, "one two three four five six seven", max_tokens=50, temperature=0.9)
    short_answer = ask(d3, "one two three", max_tokens=2, temperature=0.9)
    for job in (long_answer, short_answer):
        assert job["served_by"]["tier"] == "cpu" and job["served_by"]["quality"] == "reduced"
        assert content_of(job).startswith(CPU_DEGRADE["notice"] + "\n\n"), content_of(job)
    sent = [r["body"] for r in chat_requests(d3, "cpu-sim")]
    assert [s["options"] for s in sent] == [
        {"temperature": 0, "num_predict": CPU_DEGRADE["max_tokens"]},
        {"temperature": 0, "num_predict": 2},  # a smaller limit of the client's own stays
    ]
    answer = content_of(long_answer).removeprefix(CPU_DEGRADE["notice"] + "\n\n")
    assert len(answer.split()) == CPU_DEGRADE["max_tokens"]

    d3.fault("cpu-sim", mode="error_500")
    hosted = ask(d3, "one two three four five six seven", max_tokens=50, temperature=0.9)
    assert hosted["served_by"]["tier"] == "hosted" and hosted["served_by"]["quality"] == "reduced"
    [body] = [r["body"] for r in chat_requests(d3, "big-sim")]
    assert (body["max_tokens"], body["temperature"]) == (HOSTED_DEGRADE["max_tokens"], 0)
    assert content_of(hosted) == "[big-sim] You said:"  # three tokens, no notice configured


def test_degrade_model_replaces_the_backends_model(d3: Deployment) -> None:
    for name in ("gpu-sim", "cpu-sim"):
        d3.fault(name, mode="error_500")
    job = ask(d3, "a question")
    assert job["served_by"]["tier"] == "hosted", job
    [body] = [r["body"] for r in chat_requests(d3, "big-sim")]
    assert body["model"] == HOSTED_DEGRADE["model"]


def test_on_exhausted_from_config_and_per_request(d3: Deployment) -> None:
    for name in d3.simulators:
        d3.fault(name, mode="error_500")
    by_config = ask(d3, f"nobody can answer {uuid.uuid4()}")
    assert by_config["status"] == "failed" and "every tier failed" in by_config["error"]
    degraded = ask(d3, f"nobody can answer {uuid.uuid4()}", on_exhausted="degrade")
    assert degraded["status"] == "succeeded", degraded
    assert degraded["served_by"]["quality"] == "static" and content_of(degraded) == STATIC
    with d3.client() as client:
        waiting = d3.submit(client, f"nobody now {uuid.uuid4()}", on_exhausted="park").json()
        wait_until(lambda: waiting["id"] in d3.events("parked"), 20, 0.2, what="the job to park")
        # The relay would replay it as soon as the breakers let it; it has shown enough.
        assert client.post(f"/v1/jobs/{waiting['id']}/cancel").status_code == 200
    assert d3.events("parked").keys() == {waiting["id"]}
