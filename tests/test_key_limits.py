"""Waiters that cost nothing (api/waiters.py), with the API in this process on the test
Postgres and Redis (or a SQLite file); no worker runs, so jobs stay queued until a test
ends them as a worker would (tests.test_api.end_job)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event

from tests.services import RedisServer, wait_until
from tests.test_api import BODY, LOAD_JOB, auth, end_job
from tests.test_openai_compat import sse_payloads, stored_answer, streamed_text

CHAT = {**BODY, "model": "tierq"}


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(64) as executor:
        yield executor


def new_key(**limits: Any) -> tuple[str, str]:
    """A key with these limits of its own: (key, key id)."""
    from tierq.db import session_scope
    from tierq.keys import create_key

    with session_scope() as session:
        created = create_key(session, "limits", **limits)
    return created.key, created.id


def submit(client: TestClient, key: str, **headers: str) -> str:
    response = client.post("/v1/jobs", json=BODY, headers={**auth(key), **headers})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def assert_refused(response: Any, limit: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["limit"] == limit and f"limit {limit}" in body["detail"]
    return body


def held_waiters(client: TestClient) -> int:
    """Requests of this process waiting on a job now (what the waiters wake)."""
    waiting = client.app.state.waiters._events  # type: ignore[attr-defined]
    return sum(len(events) for events in list(waiting.values()))


# -- waiters cost nothing and never overrun -----------------------------------------------


@pytest.fixture
def slow_job_reads() -> Iterator[Callable[[float], None]]:
    """Makes every read of a job (api.routes.jobs.load_job) take this long from now on: a
    thread pool and a connection pool busy with other requests."""
    from tierq.db import get_engine

    delay = [0.0]

    def slow(*args: object) -> None:
        if LOAD_JOB in str(args[2]) and delay[0]:
            time.sleep(delay[0])

    sa_event.listen(get_engine(), "before_cursor_execute", slow)
    yield lambda seconds: delay.__setitem__(0, seconds)
    sa_event.remove(get_engine(), "before_cursor_execute", slow)


def test_a_long_poll_returns_by_its_wait_even_when_reading_the_job_is_slow(
    client: TestClient, api_key: str, pool: ThreadPoolExecutor, slow_job_reads: Any
) -> None:
    from tierq.db import session_scope
    from tierq.events import record_event

    job = submit(client, api_key)
    started = time.monotonic()
    polling = pool.submit(client.get, f"/v1/jobs/{job}", params={"wait": 1}, headers=auth(api_key))
    wait_until(lambda: held_waiters(client) == 1, 5, what="the long-poll waiting")
    slow_job_reads(4.0)
    with session_scope() as session:  # wakes the long-poll: it reads the job again, slowly
        record_event(session, job, "calling", backend="gpu-sim")
    answer = polling.result(timeout=10)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert elapsed < 1.8, f"a wait=1 long-poll took {elapsed:.1f} s"


@pytest.fixture
def sqlite_client(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The API on the zero-install default's database: a SQLite file (no LISTEN)."""
    from api.app import create_app
    from tests.conftest import _reset_caches
    from tierq.db import get_engine
    from tierq.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tierq.db'}"
    upgrade(url)
    monkeypatch.setenv("TIERQ_DATABASE_URL", url)
    _reset_caches()
    with TestClient(create_app()) as test_client:
        yield test_client
    get_engine().dispose()
    monkeypatch.undo()
    _reset_caches()


def test_on_sqlite_every_waiter_shares_one_poller(
    sqlite_client: TestClient, pool: ThreadPoolExecutor
) -> None:
    """40 long-polls cost one query per tick between them, not one each; a job that ends
    still wakes its long-poll within a tick or two."""
    from tierq.db import get_engine

    client, waiters = sqlite_client, 40
    key, _ = new_key()
    jobs = [submit(client, key) for _ in range(waiters)]
    polls = [
        pool.submit(client.get, f"/v1/jobs/{job}", params={"wait": 20}, headers=auth(key))
        for job in jobs
    ]
    wait_until(lambda: held_waiters(client) == waiters, 10, what="every long-poll waiting")
    time.sleep(0.6)  # each waiter's one re-read after the poller first sees its job

    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    sa_event.listen(get_engine(), "before_cursor_execute", record)
    time.sleep(1.5)
    sa_event.remove(get_engine(), "before_cursor_execute", record)
    # About one statement per tick (0.25 s), each about every job waited on (a bound
    # parameter per job): no waiter reads its own job while nothing changes.
    assert 0 < len(statements) <= 12, len(statements)
    assert all(s.count("?") >= waiters for s in statements), statements

    ended = time.monotonic()
    end_job(jobs[0])
    assert polls[0].result(timeout=5).json()["status"] == "succeeded"
    assert time.monotonic() - ended < 1.5
    for job in jobs[1:]:
        end_job(job)
    assert all(poll.result(timeout=5).json()["status"] == "succeeded" for poll in polls)


def test_idle_waiters_hold_no_threads_and_streams_share_one_reader(
    client: TestClient, pool: ThreadPoolExecutor, redis_server: RedisServer
) -> None:
    """Long-polls, event streams and streamed chats waiting on jobs nobody works on hold
    none of the pool's threads (a blocking Redis read each did: 250 of them starved every
    other request); the chats' tokens still arrive through the process's one reader."""
    import anyio.to_thread

    key, key_id = new_key()
    count = 8
    jobs = [submit(client, key) for _ in range(count)]
    chat = {**CHAT, "stream": True}
    chats = [
        pool.submit(client.post, "/v1/chat/completions", json=chat, headers=auth(key))
        for _ in range(count)
    ]
    waiting: list[Future[Any]] = [
        *(pool.submit(client.get, f"/v1/jobs/{j}/events", headers=auth(key)) for j in jobs),
        *(pool.submit(client.get, f"/v1/jobs/{j}?wait=30", headers=auth(key)) for j in jobs),
    ]

    def busy_threads() -> float:
        return anyio.to_thread.current_default_thread_limiter().borrowed_tokens

    try:
        every_job = lambda: len(owned_jobs(key_id)) == 2 * count  # noqa: E731
        wait_until(every_job, 10, what="every chat's job")
        wait_until(lambda: held_waiters(client) >= 2 * count, 10, what="the waiters waiting")
        busy = []
        for _ in range(20):
            busy.append(client.portal.call(busy_threads))  # type: ignore[union-attr]
            time.sleep(0.1)
        assert sorted(busy)[len(busy) // 2] <= 1, busy  # the median: start-up reads aside
    finally:  # the jobs end as a worker ends them: every waiter gets its answer
        chat_jobs = owned_jobs(key_id) - set(jobs)
        redis = redis_server.client()
        for job in chat_jobs:
            hi = {"kind": "delta", "delta": json.dumps({"content": "Hi"})}
            redis.xadd(f"tierq:stream:{job}", hi)  # type: ignore[arg-type]
        for job in [*chat_jobs, *jobs]:
            end_job(job, stored_answer("Hi there"))
    for response in (f.result(timeout=10) for f in chats):
        assert streamed_text(sse_payloads(response.text)) == "Hi there"
    assert all(f.result(timeout=10).status_code == 200 for f in waiting)
    assert client.app.state.waiters.streams.reads < 40  # type: ignore[attr-defined]


def owned_jobs(key_id: str) -> set[str]:
    from sqlalchemy import select

    from tierq.db import session_scope
    from tierq.models import Job

    with session_scope() as session:
        return {
            str(j) for j in session.scalars(select(Job.id).where(Job.owner_id == uuid.UUID(key_id)))
        }
