"""The failover engine against the simulator, real Postgres, real Redis and real workers:
every way the primary fails ends on the right tier with the right quality, and the
attempt rows tell the story."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.deployment import Deployment, backend, deployment, tier, two_tiers
from tests.services import free_port, wait_until
from tierq.db import make_engine
from tierq.models import Attempt, CircuitTransition, JobEvent

pytestmark = pytest.mark.slow


def rows(d: Deployment, query: Any) -> list[Any]:
    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query).all())
    finally:
        engine.dispose()


def attempts(d: Deployment, job_id: str) -> list[tuple[str, str, str | None]]:
    import uuid

    found = rows(
        d,
        select(Attempt.backend, Attempt.outcome, Attempt.error_class)
        .where(Attempt.job_id == uuid.UUID(job_id))
        .order_by(Attempt.id),
    )
    return [tuple(r) for r in found]


def run_jobs(d: Deployment, count: int, wait: float = 30) -> list[dict[str, Any]]:
    with d.client() as client:
        ids = [d.submit(client, f"question {i}").json()["id"] for i in range(count)]
        done = [client.get(f"/v1/jobs/{i}", params={"wait": wait}).json() for i in ids]
    return done


def start(d: Deployment, *tiers: str, beat: bool = False) -> None:
    d.stack.api()
    d.stack.spawn("beat", "beat") if beat else d.stack.relay()
    for name in tiers:
        d.stack.worker(name)


def slow_primary(urls: dict[str, str]) -> dict[str, Any]:
    config = two_tiers(urls)
    config["tiers"][0]["backends"][0]["read_timeout"] = 1
    return config


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
def test_primary_failure_modes_end_on_the_cpu_tier(
    tmp_path: Path, faults: dict, error_class: str
) -> None:
    with deployment(tmp_path, config=slow_primary) as d:
        start(d, "gpu", "cpu")
        d.fault("gpu-sim", **faults)
        for job in run_jobs(d, 2):
            assert job["status"] == "succeeded", job
            assert job["served_by"]["tier"] == "cpu" and job["served_by"]["quality"] == "reduced"
            assert job["served_by"]["backend"] == "cpu-sim"
            assert "cpu-sim" in job["result"]["choices"][0]["message"]["content"]
            story = attempts(d, job["id"])
            assert story[-1] == ("cpu-sim", "ok", None)
            assert all(a == ("gpu-sim", "error", error_class) for a in story[:-1]), story
            assert 1 <= len(story) - 1 <= 2  # tried the primary, retried at most its budget


def test_primary_killed_connection_refused(tmp_path: Path) -> None:
    def dead_primary(urls: dict[str, str]) -> dict[str, Any]:
        config = two_tiers(urls)
        config["tiers"][0]["backends"][0]["url"] = f"http://127.0.0.1:{free_port()}"
        return config

    with deployment(tmp_path, config=dead_primary) as d:
        start(d, "gpu", "cpu")
        started = time.monotonic()
        [job] = run_jobs(d, 1)
        assert job["served_by"]["tier"] == "cpu" and job["status"] == "succeeded"
        assert {a[2] for a in attempts(d, job["id"])[:-1]} == {"connect"}
        assert time.monotonic() - started < 5


def test_client_error_fails_without_retry(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        start(d, "gpu", "cpu")
        d.fault("gpu-sim", mode="context_length")  # no larger-context backend configured
        [job] = run_jobs(d, 1)
        assert job["status"] == "failed" and "context" in job["error"]
        assert attempts(d, job["id"]) == [("gpu-sim", "error", "context_length")]


def test_context_length_goes_straight_to_the_larger_backend(tmp_path: Path) -> None:
    def with_larger(urls: dict[str, str]) -> dict[str, Any]:
        return {
            "tiers": [
                tier(
                    "gpu", backend("gpu-sim", "openai", urls["gpu-sim"], larger_context="big-sim")
                ),
                tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"])),
                tier("hosted", backend("big-sim", "anthropic", urls["big-sim"])),
            ]
        }

    with deployment(
        tmp_path, config=with_larger, simulators=("gpu-sim", "cpu-sim", "big-sim")
    ) as d:
        start(d, "gpu", "cpu", "hosted")
        d.fault("gpu-sim", max_context_words=3)
        before = d.calls("cpu-sim")
        with d.client() as client:
            job = d.submit(client, "this question is far too long for the small model").json()
            job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
        assert job["status"] == "succeeded", job
        assert job["served_by"]["backend"] == "big-sim"
        assert attempts(d, job["id"]) == [
            ("gpu-sim", "error", "context_length"),
            ("big-sim", "ok", None),
        ]
        assert d.calls("cpu-sim") == before  # skipped the tier in between


def breaker_config(urls: dict[str, str]) -> dict[str, Any]:
    config = two_tiers(urls)
    config["tiers"][0]["breaker"] = {
        "window_seconds": 60,
        "min_calls": 4,
        "failure_rate": 0.5,
        "recovery_timeout": 2,
        "half_open_successes": 2,
        "slow_start_seconds": 0,
    }
    config["tiers"][0]["retry"] = {"attempts": 1}
    return config


def test_breaker_opens_half_opens_and_closes_across_two_workers(tmp_path: Path) -> None:
    with deployment(tmp_path, config=breaker_config) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu", concurrency=1)
        d.stack.worker("gpu", concurrency=1)
        d.stack.worker("cpu")
        d.fault("gpu-sim", mode="error_500")
        assert all(j["served_by"]["tier"] == "cpu" for j in run_jobs(d, 12))
        failing_calls = d.calls("gpu-sim")
        assert 4 <= failing_calls < 12  # the open breaker skipped the primary at once
        workers = {
            r[0] for r in rows(d, select(Attempt.worker).where(Attempt.backend == "gpu-sim"))
        }
        assert len(workers) == 2  # both processes saw the one shared breaker
        d.fault("gpu-sim", mode="ok")
        time.sleep(2.2)  # recovery timeout
        done = []
        for _ in range(4):  # trials one at a time, then closed
            done += run_jobs(d, 1)
        assert done[-1]["served_by"]["tier"] == "gpu"
        story = [
            (r[0], r[1])
            for r in rows(
                d,
                select(CircuitTransition.from_state, CircuitTransition.to_state)
                .where(CircuitTransition.backend == "gpu-sim")
                .order_by(CircuitTransition.id),
            )
        ]
        assert story == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def parking_config(urls: dict[str, str]) -> dict[str, Any]:
    config = breaker_config(urls)
    config["tiers"][1]["breaker"] = config["tiers"][0]["breaker"]
    config["tiers"][1]["retry"] = {"attempts": 1}
    for t in config["tiers"]:
        t["backends"][0]["health"] = {"interval": 0.5, "canary": False}
    config["emergency"] = {"retry_after": 30, "replay_rate": 4}
    return config


def test_all_tiers_down_park_then_replay_at_the_configured_rate(tmp_path: Path) -> None:
    with deployment(tmp_path, config=parking_config) as d:
        start(d, "gpu", "cpu", beat=True)
        for sim in ("gpu-sim", "cpu-sim"):
            d.fault(sim, mode="error_500")
        with d.client() as client:
            ids = [d.submit(client, f"during the outage {i}").json()["id"] for i in range(12)]
            late = d.submit(client, "too late", deadline="2020-01-01T00:00:00Z")
            wait_until(
                lambda: all(client.get(f"/v1/jobs/{i}").json()["status"] == "parked" for i in ids),
                40,
                0.5,
                what="every job parked",
            )
            parked = client.get(f"/v1/jobs/{ids[0]}").json()
            assert parked["retry_after"] and "unavailable" in parked["error"]
        assert late.status_code == 202
        for sim in ("gpu-sim", "cpu-sim"):
            d.fault(sim, mode="ok")
        result = d.wait_finished(60)
        assert result.lost == 0 and result.answered_twice == 0
        statuses = result.statuses
        assert statuses == {"succeeded": 12, "failed": 1}, statuses
        import uuid

        replayed = rows(
            d,
            select(JobEvent.created_at)
            .where(JobEvent.kind == "replayed", JobEvent.job_id.in_([uuid.UUID(i) for i in ids]))
            .order_by(JobEvent.created_at),
        )
        assert len(replayed) >= 12
        span = (replayed[-1][0] - replayed[0][0]).total_seconds()
        # 4 per second with a bucket of 4: 12 releases cannot take less than about 1.5 s
        assert span >= (12 - 4 - 1) / 4, span


def test_disabled_backend_receives_no_call(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        start(d, "gpu", "cpu")
        import httpx
        from sqlalchemy.orm import Session

        from tierq.db import session_scope  # noqa: F401 - the admin API is what we test
        from tierq.keys import create_key

        engine = make_engine(d.database_url)
        with Session(engine) as session, session.begin():
            admin = create_key(session, "ops", is_admin=True).key
        engine.dispose()
        headers = {"Authorization": f"Bearer {admin}"}
        denied = httpx.post(
            f"{d.stack.api_url}/v1/admin/backends/gpu-sim/disable",
            headers={"Authorization": f"Bearer {d.key}"},
        )
        assert denied.status_code == 403
        off = httpx.post(f"{d.stack.api_url}/v1/admin/backends/gpu-sim/disable", headers=headers)
        assert off.status_code == 200 and off.json()["disabled"] is True
        before = d.calls("gpu-sim")
        jobs = run_jobs(d, 5)
        assert all(j["served_by"]["backend"] == "cpu-sim" for j in jobs)
        assert d.calls("gpu-sim") == before
        on = httpx.post(f"{d.stack.api_url}/v1/admin/backends/gpu-sim/enable", headers=headers)
        assert on.json()["disabled"] is False
        assert run_jobs(d, 1)[0]["served_by"]["backend"] == "gpu-sim"
        unknown = httpx.post(f"{d.stack.api_url}/v1/admin/backends/nope/disable", headers=headers)
        assert unknown.status_code == 404


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
        with d.client() as client:

            def ask(content: str) -> dict[str, Any]:
                job = d.submit(client, content).json()
                return client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()

            fresh = ask("what is   tierq?")
            assert fresh["served_by"]["quality"] == "full"
            d.fault("gpu-sim", mode="error_500")
            cached = ask("what is tierq?")  # the same question, whitespace aside
            rules = ask("what are your opening hours?")
            static = ask("something nobody asked before")
        answer = fresh["result"]["choices"][0]["message"]["content"]
        assert cached["served_by"]["quality"] == "cached"
        assert cached["result"]["choices"][0]["message"]["content"] == answer
        assert cached["served_by"]["backend"] == fresh["id"]  # which answer it reused
        assert rules["served_by"]["quality"] == "rules"
        assert rules["result"]["choices"][0]["message"]["content"] == "We are open 9 to 5."
        assert static["served_by"]["quality"] == "static"
        assert static["result"]["choices"][0]["message"]["content"].startswith("Sorry")
