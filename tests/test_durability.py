"""Crash tests with real processes: each ends with "N accepted, N finished, 0 lost, 0
answered twice", read from the database.

Workers, relay and API run as real processes; the tests SIGKILL them, flush or stop Redis
and stop Postgres (each test has its own throwaway instances). Timings are shortened by
environment (3 s leases) so recovery fits in a test; the broker's visibility timeout stays
at its production value (an hour) to show recovery does not wait for it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deployment import Deployment, deployment
from tests.services import wait_until
from tierq.db import make_engine

pytestmark = pytest.mark.slow
BOTH_MODES = ["postgres-redis", "sqlite-filesystem"]


@pytest.fixture
def pg_redis(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def assert_kept_promise(d: Deployment, timeout: float = 60) -> None:
    result = d.wait_finished(timeout)
    print(result)
    assert result.finished == result.accepted
    assert result.lost == 0 and result.answered_twice == 0
    assert result.statuses == {"succeeded": result.accepted}, result


def running_count(d: Deployment) -> int:
    from sqlalchemy import func, select

    from tierq.models import Job

    engine = make_engine(d.database_url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).where(Job.status == "running"))
    engine.dispose()
    return int(n or 0)


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_submit_answer_and_conversation_resumed(tmp_path: Path, mode: str) -> None:
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        with d.client() as client:
            job = d.submit(client, "first question").json()
            started = time.monotonic()
            done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
            assert done["status"] == "succeeded", done
            assert time.monotonic() - started < 10
            answer = done["result"]["choices"][0]["message"]["content"]
            assert "first question" in answer and "gpu-sim" in answer
            assert done["served_by"] == {
                "tier": "gpu",
                "backend": "gpu-sim",
                "model": done["served_by"]["model"],
                "quality": "full",
                "attempts": 1,
            }
            conversation = job["conversation_id"]
            follow = client.post(
                f"/v1/conversations/{conversation}/messages",
                json={"model": "m", "messages": [{"role": "user", "content": "second question"}]},
            )
            d.jobs.append(follow.json()["id"])
            client.get(f"/v1/jobs/{follow.json()['id']}", params={"wait": 30})
            turns = client.get(f"/v1/conversations/{conversation}").json()["turns"]
        assert [(t["seq"], t["role"]) for t in turns] == [
            (0, "user"),
            (1, "assistant"),
            (2, "user"),
            (3, "assistant"),
        ]
        assert "second question" in turns[3]["content"]
        assert_kept_promise(d)


def test_long_poll_is_woken_by_the_answer(pg_redis: Deployment) -> None:
    d = pg_redis
    d.stack.api()
    d.stack.relay()
    d.stack.worker("gpu")
    d.fault("gpu-sim", latency_ms=1500)
    with d.client() as client:
        job = d.submit(client).json()
        started = time.monotonic()
        done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
        waited = time.monotonic() - started
    assert done["status"] == "succeeded"
    # woken by NOTIFY, not by the 5 s safety re-check nor the 20 s limit
    assert 1.4 < waited < 4.0, waited


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_pool_child_killed_mid_call(tmp_path: Path, mode: str) -> None:
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        worker = d.stack.worker("gpu", concurrency=2)
        d.fault("gpu-sim", latency_ms=2500)
        with d.client() as client:
            for i in range(8):
                assert d.submit(client, f"job {i}").status_code == 202
        wait_until(lambda: running_count(d) >= 2, 20, what="jobs running")
        children = worker.pool_children()
        assert children
        os.kill(children[0], signal.SIGKILL)
        d.fault("gpu-sim", latency_ms=200)
        assert_kept_promise(d)
        assert worker.alive()


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_whole_worker_killed_recovers_before_visibility_timeout(tmp_path: Path, mode: str) -> None:
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        first = d.stack.worker("gpu", concurrency=2)
        d.fault("gpu-sim", latency_ms=2000)
        with d.client() as client:
            for i in range(10):
                d.submit(client, f"job {i}")
        wait_until(lambda: running_count(d) >= 2, 20, what="jobs running")
        killed_at = time.monotonic()
        first.kill_group(signal.SIGKILL)
        d.fault("gpu-sim", latency_ms=100)
        d.stack.worker("gpu", concurrency=2)
        assert_kept_promise(d, timeout=60)
        # The broker's visibility timeout is 3600 s: the lease, not Redis, brought them back.
        assert time.monotonic() - killed_at < 60


def test_redis_flushed_with_100_jobs_queued(pg_redis: Deployment) -> None:
    d = pg_redis
    d.stack.api()
    d.stack.relay()
    d.stack.worker("gpu", concurrency=2)  # running through the flush: it must keep consuming
    d.fault("gpu-sim", latency_ms=1000)
    with d.client() as client:
        for i in range(100):
            assert d.submit(client, f"job {i}").status_code == 202
    assert d.redis is not None
    wait_until(lambda: d.redis.client().llen("gpu") >= 90, 10, what="messages queued")
    d.redis.client().flushall()
    d.fault("gpu-sim", latency_ms=0)
    started = time.monotonic()
    assert_kept_promise(d, timeout=90)
    # Re-published as soon as the relay saw the empty broker, not republish_after later.
    print(f"100 jobs answered {time.monotonic() - started:.1f}s after the flush")


def test_redis_stopped_during_submits(pg_redis: Deployment) -> None:
    d = pg_redis
    assert d.redis is not None
    d.stack.api()
    d.stack.relay()
    d.stack.worker("gpu")
    with d.client() as client:
        for i in range(5):
            assert d.submit(client, f"before {i}").status_code == 202
        d.redis.stop()
        for i in range(10):
            response = d.submit(client, f"during {i}")
            assert response.status_code == 202, response.text
        d.redis.start()
        for i in range(5):
            assert d.submit(client, f"after {i}").status_code == 202
    assert len(d.jobs) == 20
    assert_kept_promise(d, timeout=90)


def test_postgres_stopped_during_submits(tmp_path: Path) -> None:
    with deployment(tmp_path, "throwaway-postgres") as d:
        assert d.postgres is not None
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        with d.client() as client:
            for i in range(5):
                assert d.submit(client, f"before {i}").status_code == 202
            d.postgres.stop()
            for i in range(5):
                response = d.submit(
                    client,
                    f"during {i}",
                )
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"]
                assert response.headers["content-type"] == "application/problem+json"
            d.postgres.start()
            wait_until(
                lambda: d.submit(client, "after").status_code == 202,
                30,
                0.5,
                what="submits accepted again",
            )
        from sqlalchemy import func, select

        from tierq.models import Turn

        engine = make_engine(d.database_url)
        with engine.connect() as conn:
            during = conn.scalar(select(func.count()).where(Turn.content.like("during%")))
        engine.dispose()
        assert during == 0  # a 503 accepted nothing
        assert_kept_promise(d, timeout=90)


def test_api_killed_after_commit_before_publish(pg_redis: Deployment) -> None:
    d = pg_redis
    d.stack.relay()
    d.stack.worker("gpu")
    crashing = d.stack.api(TIERQ_CRASH_AT="api.after_commit")
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {d.key}", "Idempotency-Key": "crash-1"}
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{d.stack.api_url}/v1/jobs", json=body, headers=headers, timeout=10)
    wait_until(lambda: not crashing.alive(), 10, what="api to die")
    d.stack.api()
    # The client retries with its key: the job committed before the crash is the answer.
    retried = httpx.post(f"{d.stack.api_url}/v1/jobs", json=body, headers=headers, timeout=10)
    assert retried.status_code == 202 and retried.headers["idempotent-replayed"] == "true"
    d.jobs.append(retried.json()["id"])
    assert_kept_promise(d, timeout=30)


def test_same_message_delivered_twice_runs_once(pg_redis: Deployment) -> None:
    from tierq import broker

    d = pg_redis
    d.stack.api()
    with d.client() as client:
        job_id = d.submit(client).json()["id"]
    for _ in range(2):  # two more doorbells for the same job: three deliveries in all
        assert broker.publish(job_id, "gpu")
    before = d.calls("gpu-sim")
    d.stack.worker("gpu", concurrency=2)
    assert_kept_promise(d, timeout=30)
    time.sleep(1)  # let the duplicate deliveries arrive and be dropped
    assert d.calls("gpu-sim") - before == 1


def test_poison_job_ends_dead_while_others_go_on(pg_redis: Deployment) -> None:
    d = pg_redis
    d.stack.api()
    d.stack.relay()
    worker = d.stack.worker("gpu", concurrency=2, TIERQ_CRASH_AT="worker.before_call@POISON")
    with d.client() as client:
        poison = d.submit(client, "POISON pill").json()["id"]
        for i in range(6):
            d.submit(client, f"good {i}")
    d.jobs.remove(poison)
    assert_kept_promise(d, timeout=60)
    wait_until(
        lambda: d.ledger().accepted and _status(d, poison) == "dead",
        60,
        0.5,
        what="the poison job to be dead",
    )
    with d.client() as client:
        job = client.get(f"/v1/jobs/{poison}").json()
    assert job["status"] == "dead" and "poison" in job["error"]
    assert job["deliveries"] == 3
    assert worker.alive()


def _status(d: Deployment, job_id: str) -> str:
    with d.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()["status"]
