"""Exactly-once effect, at the database: the claim, the lease fence and the one-answer
constraint, driven through the worker's own functions against real Postgres; and bad input
that changes nothing, neither in the database nor in the broker.

The functions a worker calls are called directly, so each step of a lost lease happens in
a known order instead of by luck of timing; they run on Postgres and on SQLite (the
zero-install default). One last test shows the same fence between real processes.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from tests.conftest import _reset_caches
from tests.deployment import deployment
from tests.services import RedisServer, wait_until
from tierq import leases as claim
from tierq import transitions
from tierq.config import load_config
from tierq.db import db_now, get_engine, session_scope
from tierq.keys import create_key
from tierq.migrate import upgrade
from tierq.models import Conversation, Job, JobStatus, Turn
from tierq.settings import get_settings
from worker.relay import Relay

TIER = "gpu"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _answer(content: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "tierq": {"tier": TIER},
    }


@pytest.fixture(params=["postgres", "sqlite"])
def fenced_database(
    request: pytest.FixtureRequest,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """The test's database: the session's Postgres, or a SQLite file (the zero-install
    default, where the same conditional UPDATEs must fence just as well)."""
    if request.param == "postgres":
        yield env["TIERQ_DATABASE_URL"]
        return
    url = f"sqlite:///{tmp_path / 'fencing.db'}"
    upgrade(url)
    monkeypatch.setenv("TIERQ_DATABASE_URL", url)
    _reset_caches()
    assert get_engine().dialect.name == "sqlite"
    yield url
    get_engine().dispose()
    monkeypatch.undo()
    _reset_caches()


@pytest.fixture
def job_id(fenced_database: str) -> uuid.UUID:
    """A queued job with its user turn, as the API would have committed it."""
    with session_scope() as session:
        owner = uuid.UUID(create_key(session, "fencing").id)
        conversation = Conversation(owner_id=owner, turn_count=2)
        session.add(conversation)
        session.flush()
        session.add(Turn(conversation_id=conversation.id, seq=0, role="user", content="hello"))
        job = Job(
            owner_id=owner,
            conversation_id=conversation.id,
            answer_seq=1,
            status=JobStatus.QUEUED,
            tier=TIER,
            request=BODY,
            request_hash=uuid.uuid4().hex,
        )
        session.add(job)
        session.flush()
        return job.id


def _claim(job_id: uuid.UUID, owner: str, seconds: float) -> claim.Lease | None:
    with session_scope() as session:
        return claim.claim(session, job_id, TIER, owner, seconds)


def _succeed(lease: claim.Lease, content: str) -> bool:
    with session_scope() as session:
        job = session.get_one(Job, lease.job_id)
        return transitions.succeed(
            session, lease, job, _answer(content), backend="b", model="m", quality="full"
        )


def _answer_turns(job_id: uuid.UUID) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Turn.content).where(Turn.job_id == job_id, Turn.role == "assistant")
            )
        )


def _job(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def _expire_and_reclaim(lease: claim.Lease) -> None:
    """Let the lease run out (the worker stalled or died) and run the relay's reclaim."""
    with session_scope() as session:
        session.execute(
            Job.__table__.update().where(Job.id == lease.job_id).values(lease_expires_at=db_now(-1))
        )
    relay = Relay(load_config(), get_settings())
    assert relay._reclaim_expired() >= 1
    # It waits a random part of a third of a lease (its crashed neighbours wait apart from
    # it), then the relay makes it queued again.
    job = _job(lease.job_id)
    assert job.status == JobStatus.RETRY_WAIT and job.lost_leases == 1
    with session_scope() as session:
        session.execute(
            Job.__table__.update().where(Job.id == lease.job_id).values(due_at=db_now(-1))
        )
    assert relay._wake_due() >= 1
    assert _job(lease.job_id).status == JobStatus.QUEUED


def test_a_second_claim_of_a_running_job_is_a_dropped_duplicate(job_id: uuid.UUID) -> None:
    first = _claim(job_id, "worker-a", 30)
    assert first is not None
    assert _claim(job_id, "worker-b", 30) is None
    job = _job(job_id)
    assert (job.status, job.lease_token, job.deliveries) == ("running", first.token, 1)


def test_a_worker_that_lost_its_lease_cannot_write_its_answer(job_id: uuid.UUID) -> None:
    stale = _claim(job_id, "worker-a", 30)
    assert stale is not None
    _expire_and_reclaim(stale)
    current = _claim(job_id, "worker-b", 30)
    assert current is not None and current.token != stale.token

    # The stalled worker wakes up with its answer: every fenced write refuses it.
    with session_scope() as session:
        assert not claim.renew(session, stale, 30)
    assert not _succeed(stale, "stale answer")
    with session_scope() as session:
        assert not transitions.fail(session, stale, "stale failure")
        assert not transitions.retry_later(session, stale, 1, "stale retry")
        assert not transitions.escalate(session, stale, TIER, "cpu", "stale escalation")
    job = _job(job_id)
    assert (job.status, job.lease_token, job.result) == ("running", current.token, None)
    assert _answer_turns(job_id) == []

    assert _succeed(current, "the answer")
    job = _job(job_id)
    assert job.status == "succeeded" and job.deliveries == 2
    assert _answer_turns(job_id) == ["the answer"]
    # A late duplicate delivery after the answer finds nothing to claim.
    assert _claim(job_id, "worker-c", 30) is None


def test_the_database_refuses_a_second_answer_for_one_job(job_id: uuid.UUID) -> None:
    lease = _claim(job_id, "worker-a", 30)
    assert lease is not None and _succeed(lease, "the answer")
    job = _job(job_id)
    # Another position of the conversation, so only the one-answer-per-job rule can object.
    # Postgres names the constraint; SQLite names its column.
    refused = "uq_turns_job_answer|turns.job_id"
    with pytest.raises(IntegrityError, match=refused), session_scope() as session:
        session.add(
            Turn(
                conversation_id=job.conversation_id,
                seq=job.answer_seq + 5,
                role="assistant",
                content="a second answer",
                job_id=job_id,
            )
        )
        session.flush()
    assert _answer_turns(job_id) == ["the answer"]


# Bad input changes nothing (DESIGN invariant 7): no row, and no message on the broker.


@pytest.fixture
def api(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as client:
        yield client


def _broker_messages(redis_server: RedisServer) -> int:
    """Every message in every queue of the test process's broker."""
    client = redis_server.client()
    return sum(int(client.llen(k)) for k in client.keys("*") if client.type(k) == b"list")


def _rows() -> tuple[int, int, int]:
    with session_scope() as session:
        return (
            int(session.scalar(select(func.count()).select_from(Job)) or 0),
            int(session.scalar(select(func.count()).select_from(Turn)) or 0),
            int(session.scalar(select(func.count()).select_from(Conversation)) or 0),
        )


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": BODY["messages"]}, 422),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, 422),
        ({**BODY, "priority": 1000}, 422),
        ({**BODY, "tools": [{"type": "nope"}]}, 422),
        ({**BODY, "conversation_id": str(uuid.uuid4())}, 404),
    ],
)
def test_bad_input_publishes_no_message(
    api: TestClient, api_key: str, redis_server: RedisServer, body: dict[str, Any], status: int
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    before = (_rows(), _broker_messages(redis_server))
    response = api.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    time.sleep(0.2)  # a publish is synchronous, but give a stray one time to land
    assert (_rows(), _broker_messages(redis_server)) == before
    # The same count does move for good input: the check above can fail.
    assert api.post("/v1/jobs", json=BODY, headers=headers).status_code == 202
    assert _broker_messages(redis_server) == before[1] + 1


# The same fence between real processes: a worker that stalls past its lease wakes up to
# find the job answered by another, and its own answer is refused.


@pytest.mark.slow
def test_a_stalled_worker_that_wakes_after_its_lease_writes_nothing(tmp_path: Path) -> None:
    with deployment(tmp_path, simulators=("gpu-sim", "cpu-sim")) as d:
        d.stack.api()
        d.stack.relay()
        stalling = d.stack.worker("gpu", calls=1)
        d.fault("gpu-sim", latency_ms=1000)
        with d.client() as client:
            job_id = d.submit(client, "stall me").json()["id"]
        wait_until(lambda: d.calls("gpu-sim") == 1, 10, what="the call to start")
        child = stalling.popen.pid
        os.kill(child, signal.SIGSTOP)  # a GC pause, a frozen VM: its lease keeper stops too
        try:
            d.fault("gpu-sim", latency_ms=0)
            d.stack.worker("gpu", calls=1)
            answered = d.wait_finished(30)
            before = d.job(job_id)
        finally:
            os.kill(child, signal.SIGCONT)
        # It wakes with the backend's answer in hand and tries to save it, or its lease
        # keeper sees first that the lease is gone and stops the call.
        wait_until(
            lambda: any(
                seen in stalling.output()
                for seen in ("lease lost before the answer was saved", "call stopped (lost)")
            ),
            20,
            what="the stalled worker to try its write",
        )
        after = d.job(job_id)
        ledger = d.ledger()
    assert answered.statuses == {"succeeded": 1}
    assert (ledger.answered_twice, ledger.mismatched) == (0, 0)
    assert after == before  # not one column changed by the refused write
    assert (after["deliveries"], after["lost_leases"]) == (2, 1)
