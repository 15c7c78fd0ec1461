"""Crash tests with real processes: each ends with "N accepted, N finished, 0 lost, 0
answered twice", read from the database.

Workers, relay and API run as real processes; the tests SIGKILL them, flush the broker or
stop Redis and Postgres (those tests have throwaway instances of their own; scenarios that
leave a deployment intact share one per mode). Most run in both modes: Postgres + Redis,
and the zero-install SQLite + folder broker. Timings are shortened by environment (3 s
leases) so recovery fits in a test; the broker's visibility timeout stays at its
production value (an hour) to show recovery does not wait for it.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deployment import FAST_TIMINGS, Deployment, backend, deployment, tier
from tests.services import wait_until
from tests.stack import Process
from tierq.db import make_engine

pytestmark = pytest.mark.slow
BOTH_MODES = ["postgres-redis", "sqlite-filesystem"]
LEASE_SECONDS = float(FAST_TIMINGS["TIERQ_LEASE_SECONDS"])
RELAY_INTERVAL = float(FAST_TIMINGS["TIERQ_RELAY_INTERVAL"])


@pytest.fixture
def pg_redis(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def assert_kept_promise(d: Deployment, timeout: float = 60) -> None:
    result = d.wait_finished(timeout)
    print(result)
    assert result.finished == result.accepted
    assert result.lost == 0 and result.answered_twice == 0
    assert result.mismatched == 0, result
    assert result.statuses == {"succeeded": result.accepted}, result


def per_job(d: Deployment, column: str) -> dict[str, int]:
    """One counter column of the jobs table, for each of the test's jobs."""
    from sqlalchemy import select

    from tierq.models import Job

    engine = make_engine(d.database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, getattr(Job, column).label("n")).where(Job.id.in_(_ids(d)))
        ).all()
    engine.dispose()
    return {str(row.id): row.n for row in rows}


def _ids(d: Deployment) -> list[uuid.UUID]:
    return [uuid.UUID(j) for j in d.jobs]


def assert_recovered_from_a_lost_lease(d: Deployment) -> None:
    """At least one job really was interrupted: its lease ran out with its worker, the
    relay re-queued it, and a second claim finished it. Without this a kill that landed
    between jobs would pass for a recovery."""
    requeued = set(d.events("requeued"))
    lost = {j for j, n in per_job(d, "lost_leases").items() if n >= 1}
    claimed_twice = {j for j, n in per_job(d, "deliveries").items() if n >= 2}
    assert requeued & lost & claimed_twice, (requeued, lost, claimed_twice)


def running_count(d: Deployment) -> int:
    from sqlalchemy import func, select

    from tierq.models import Job

    engine = make_engine(d.database_url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).where(Job.status == "running"))
    engine.dispose()
    return int(n or 0)


# Scenarios that leave the deployment as they found it share one per mode: its API, relay
# and a gpu worker that crashes on any job whose message says POISON.
POISON_CRASH = "worker.before_call@POISON"


def _shared_config(urls: dict[str, str]) -> dict[str, Any]:
    """gpu → cpu, with a gpu read timeout that leaves room for calls several leases long."""
    return {
        "tiers": [
            tier("gpu", backend("gpu-sim", "openai", urls["gpu-sim"], read_timeout=30)),
            tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"])),
        ]
    }


@dataclass
class Shared:
    d: Deployment
    worker: Process

    def log_count(self, text: str) -> int:
        return self.worker.output().count(text)


@pytest.fixture(scope="class", params=BOTH_MODES)
def shared_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shared]:
    folder = tmp_path_factory.mktemp(request.param)
    with deployment(folder, request.param, config=_shared_config) as d:
        d.stack.api()
        d.stack.relay()
        worker = d.stack.worker("gpu", calls=2, TIERQ_CRASH_AT=POISON_CRASH)
        yield Shared(d, worker)


@pytest.fixture
def shared(shared_deployment: Shared) -> Shared:
    """The shared deployment, with no jobs of earlier tests counted and simulators reset."""
    shared_deployment.d.jobs.clear()
    for url in shared_deployment.d.simulators.values():
        httpx.post(f"{url}/_sim/reset").raise_for_status()
    return shared_deployment


class TestOnASharedDeployment:
    def test_submit_answer_and_conversation_resumed(self, shared: Shared) -> None:
        d = shared.d
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

    def test_long_poll_is_woken_by_the_answer(self, shared: Shared) -> None:
        d = shared.d
        d.fault("gpu-sim", latency_ms=1500)
        with d.client() as client:
            job = d.submit(client).json()
            started = time.monotonic()
            done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
            waited = time.monotonic() - started
        assert done["status"] == "succeeded"
        # Woken by NOTIFY (on SQLite, its quick re-check), not by Postgres' 5 s safety
        # re-check nor the 20 s limit.
        assert 1.4 < waited < 4.0, waited

    def test_api_killed_after_commit_before_publish(self, shared: Shared) -> None:
        d = shared.d
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

    def test_same_message_delivered_twice_runs_once(self, shared: Shared) -> None:
        d = shared.d
        received, dropped = shared.log_count("] received"), shared.log_count("not claimable")
        d.fault("gpu-sim", latency_ms=1500)  # the duplicate arrives while the first runs
        with d.client() as client:
            job_id = d.submit(client).json()["id"]
        wait_until(lambda: d.job(job_id)["status"] == "running", 10, what="the job to run")
        d.publish(job_id, "gpu")  # a second doorbell, on the deployment's own broker
        assert_kept_promise(d, timeout=30)
        wait_until(
            lambda: shared.log_count("not claimable") > dropped,
            10,
            what="the duplicate to be dropped",
        )
        time.sleep(0.5)  # a third delivery, if there were one, would show by now
        assert shared.log_count("] received") - received == 2, shared.worker.output()
        assert shared.log_count("not claimable") - dropped == 1, shared.worker.output()
        assert d.job(job_id)["deliveries"] == 1
        assert d.calls("gpu-sim") == 1

    def test_lease_is_renewed_during_a_call_longer_than_the_lease(self, shared: Shared) -> None:
        d = shared.d  # its relay would re-queue the job if the lease ran out during the call
        call_ms = int(2.5 * LEASE_SECONDS * 1000)
        d.fault("gpu-sim", latency_ms=call_ms)
        with d.client() as client:
            job_id = d.submit(client, "a long answer").json()["id"]
        assert_kept_promise(d, timeout=call_ms / 1000 + 30)
        job = d.job(job_id)
        assert (job["deliveries"], job["attempts"], job["lost_leases"]) == (1, 1, 0)
        assert d.events("requeued") == {}
        assert d.calls("gpu-sim") == 1

    def test_poison_job_ends_dead_while_others_go_on(self, shared: Shared) -> None:
        """A job that kills its worker process every time (a crash in a C extension, an OOM
        kill) takes the process and its other calls down with it; an orchestrator restarts
        it (here, the test). The poison job is dead after MAX_DELIVERIES lost leases; its
        neighbours, whose leases ran out with its own, come back apart from it (staggered)
        and are answered, none taken for a poison job."""
        d = shared.d
        with d.client() as client:
            poison = d.submit(client, "POISON pill").json()["id"]
            for i in range(6):
                d.submit(client, f"good {i}")
        d.jobs.remove(poison)
        restarts = 0
        deadline = time.monotonic() + 90
        while _status(d, poison) != "dead" and time.monotonic() < deadline:
            if not shared.worker.alive():  # the orchestrator's restart
                assert shared.worker.popen.returncode == 137
                shared.worker = d.stack.worker("gpu", calls=2, TIERQ_CRASH_AT=POISON_CRASH)
                restarts += 1
            time.sleep(0.2)
        assert_kept_promise(d, timeout=60)
        with d.client() as client:
            job = client.get(f"/v1/jobs/{poison}").json()
        assert job["status"] == "dead" and "poison" in job["error"]
        max_deliveries = int(FAST_TIMINGS["TIERQ_MAX_DELIVERIES"])
        assert job["deliveries"] == max_deliveries
        assert d.job(poison)["lost_leases"] == max_deliveries
        assert restarts >= max_deliveries - 1  # every delivery of it killed its worker
        assert all(n < max_deliveries for n in per_job(d, "lost_leases").values())


def _status(d: Deployment, job_id: str) -> str:
    with d.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()["status"]


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_worker_process_killed_mid_call(tmp_path: Path, mode: str) -> None:
    """The worker process killed (SIGKILL) while its calls are in flight. Its calls run in
    threads of that one process (there are no pool children): they die with it, the backend
    sees them aborted, their leases run out, the relay re-queues them, a new worker answers
    them once, and the jobs still waiting in the broker too."""
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        worker = d.stack.worker("gpu", calls=4)
        d.fault("gpu-sim", latency_ms=2500)
        with d.client() as client:
            for i in range(8):
                assert d.submit(client, f"job {i}").status_code == 202

        def stats() -> dict[str, int]:
            return httpx.get(f"{d.simulators['gpu-sim']}/_sim/stats").json()  # type: ignore[no-any-return]

        def calling() -> set[str]:
            rows = {j: d.job(j) for j in d.jobs}
            return {j for j, r in rows.items() if r["status"] == "running" and r["calling_backend"]}

        wait_until(
            lambda: stats()["in_flight"] >= 4 and len(calling()) >= 4, 20, what="4 calls in flight"
        )
        interrupted, aborted = calling(), stats()["aborted"]
        os.kill(worker.popen.pid, signal.SIGKILL)  # the process: its threads and calls with it
        worker.popen.wait(10)
        wait_until(
            lambda: stats()["aborted"] - aborted == len(interrupted),
            10,
            what="the backend to see the killed calls aborted",
        )
        d.fault("gpu-sim", latency_ms=200)
        d.stack.worker("gpu", calls=4)
        assert_kept_promise(d)
        assert_recovered_from_a_lost_lease(d)
        # Exactly the calls in flight at the kill were recovered through a lost lease.
        lost = {j for j, n in per_job(d, "lost_leases").items() if n >= 1}
        assert lost == interrupted, (lost, interrupted)
        assert set(d.events("requeued")) == interrupted


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_whole_worker_killed_recovers_before_visibility_timeout(tmp_path: Path, mode: str) -> None:
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        first = d.stack.worker("gpu", calls=2)
        d.fault("gpu-sim", latency_ms=2000)
        with d.client() as client:
            for i in range(10):
                d.submit(client, f"job {i}")
        wait_until(lambda: running_count(d) >= 2, 20, what="jobs running")
        killed_at = time.monotonic()
        first.kill_group(signal.SIGKILL)
        d.fault("gpu-sim", latency_ms=100)
        d.stack.worker("gpu", calls=2)
        assert_kept_promise(d, timeout=60)
        # The broker's visibility timeout is 3600 s: the lease, not Redis, brought them back.
        assert time.monotonic() - killed_at < 60
        assert_recovered_from_a_lost_lease(d)


# Without empty-broker detection the flushed jobs would wait out republish_after.
NO_EARLY_REPUBLISH = {"TIERQ_REPUBLISH_AFTER": "600"}
# The relay sees the empty broker on its next sweep; 50 sweeps is headroom for a busy
# machine, and still 60 times sooner than republish_after.
REPUBLISHED_WITHIN = 50 * RELAY_INTERVAL


@pytest.mark.parametrize("mode", BOTH_MODES)
def test_broker_flushed_with_100_jobs_queued(tmp_path: Path, mode: str) -> None:
    """Redis flushed, or the folder broker's queue wiped, with a backlog queued."""
    with deployment(tmp_path, mode, env=NO_EARLY_REPUBLISH) as d:
        d.stack.api()
        relay = d.stack.relay()
        d.stack.worker("gpu", calls=2)  # running through the flush: it must keep consuming
        d.fault("gpu-sim", latency_ms=1000)
        with d.client() as client:
            for i in range(100):
                assert d.submit(client, f"job {i}").status_code == 202
        wait_until(lambda: d.queued_messages("gpu") >= 90, 10, what="messages queued")
        d.flush_broker()
        flushed_at = time.monotonic()
        d.fault("gpu-sim", latency_ms=0)
        wait_until(
            lambda: d.queued_messages("gpu") > 0,
            REPUBLISHED_WITHIN,
            0.02,
            what="the relay to re-publish into the empty broker",
        )
        republished = time.monotonic() - flushed_at
        assert_kept_promise(d, timeout=90)
        print(f"re-published {republished:.1f}s after the flush")
        assert "broker came back empty" in relay.output()


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


@pytest.mark.parametrize("point", ["worker.after_call", "worker.before_commit"])
def test_worker_dies_between_the_answer_and_its_commit(tmp_path: Path, point: str) -> None:
    """The backend answered, the worker died before the answer was committed: the job runs
    again (at least once) and is answered once."""
    # A longer lease than the others: the crashed job must not come back to the crashing
    # worker (a second crash) before the test has stopped it.
    with deployment(tmp_path, env={"TIERQ_LEASE_SECONDS": "6"}) as d:
        d.stack.api()
        d.stack.relay()
        crashing = d.stack.worker("gpu", calls=1, TIERQ_CRASH_AT=point)
        with d.client() as client:
            victim = d.submit(client, "the victim").json()["id"]
        # The worker process itself dies there (its calls run on threads, not pool children).
        wait_until(lambda: not crashing.alive(), 30, what=f"the worker to die at {point}")
        assert crashing.popen.returncode == 137
        assert d.calls("gpu-sim") == 1
        job = d.job(victim)
        # The answer died with the worker, and so did its turn (the ledger would see it).
        assert job["status"] == "running" and job["result"] is None, job
        assert d.ledger().mismatched == 0
        d.stack.worker("gpu", calls=2)
        with d.client() as client:
            for i in range(3):
                d.submit(client, f"job {i}")
        assert_kept_promise(d, timeout=60)
        job = d.job(victim)
        assert (job["deliveries"], job["lost_leases"]) == (2, 1)
        assert victim in d.events("requeued")
        assert d.calls("gpu-sim") == len(d.jobs) + 1  # the victim's call ran twice
