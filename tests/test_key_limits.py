"""Per-key limits (api/key_limits.py) and waiters that cost nothing (api/waiters.py), with the
API in this process on the test Postgres and Redis (or a SQLite file); no worker runs, so
jobs stay queued until a test ends them as a worker would (tests.test_api.end_job)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event

from tests.services import RedisServer, wait_until
from tests.test_api import BODY, LOAD_JOB, auth, end_job, row_counts
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


# -- requests per second ------------------------------------------------------------------


def test_past_its_requests_per_second_a_key_gets_429_until_its_bucket_refills(
    client: TestClient,
) -> None:
    key, _ = new_key(rps=1)  # a bucket of two seconds' worth: two requests
    other, _ = new_key()
    assert [client.get("/v1/jobs", headers=auth(key)).status_code for _ in range(2)] == [200] * 2
    refused = client.get("/v1/jobs", headers=auth(key))
    assert_refused(refused, "rps")
    assert refused.headers["retry-after"] == "1"
    assert client.get("/v1/jobs", headers=auth(other)).status_code == 200  # its own bucket
    time.sleep(1.0)  # what Retry-After said
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200


def test_a_bucket_refills_at_the_rate_and_a_refused_request_takes_nothing() -> None:
    from api.key_limits import take_token

    bucket, wait = take_token(None, 2.0, now=100.0)  # two seconds' worth: four requests
    for _ in range(3):
        bucket, wait = take_token(bucket, 2.0, now=100.0)
    assert wait == 0.0 and bucket.tokens == 0.0
    bucket, wait = take_token(bucket, 2.0, now=100.25)  # half a request refilled
    assert wait == 0.25 and bucket.tokens == 0.5
    bucket, wait = take_token(bucket, 2.0, now=100.5)  # the refused one took nothing
    assert wait == 0.0 and bucket.tokens == 0.0
    bucket, wait = take_token(bucket, 2.0, now=1000.0)  # never more than the burst
    assert wait == 0.0 and bucket.tokens == 3.0


def test_a_keys_own_limit_wins_over_the_default_and_zero_means_none(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierq.settings import get_settings

    monkeypatch.setenv("TIERQ_KEY_RPS", "0.1")  # the default: a bucket of one request
    get_settings.cache_clear()
    try:
        default, _ = new_key()
        own, _ = new_key(rps=1)  # two requests
        unlimited, _ = new_key(rps=0)

        def passed(key: str, tries: int) -> list[int]:
            return [client.get("/v1/jobs", headers=auth(key)).status_code for _ in range(tries)]

        assert passed(default, 2) == [200, 429]
        assert passed(own, 3) == [200, 200, 429]
        assert passed(unlimited, 20) == [200] * 20
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


# -- jobs at once -------------------------------------------------------------------------


def test_a_key_at_its_jobs_at_once_is_refused_on_every_submit_path_and_nothing_is_written(
    client: TestClient, env: dict[str, str]
) -> None:
    key, _ = new_key(max_jobs=2)
    first = submit(client, key, **{"Idempotency-Key": "first"})
    submit(client, key)
    conversation = client.post("/v1/conversations", json={}, headers=auth(key)).json()["id"]
    before = row_counts(env["TIERQ_DATABASE_URL"])

    assert_refused(client.post("/v1/jobs", json=BODY, headers=auth(key)), "jobs")
    path = f"/v1/conversations/{conversation}/messages"
    assert_refused(client.post(path, json=BODY, headers=auth(key)), "jobs")
    chat = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert assert_refused(chat, "jobs")["error"]["code"] == "rate_limit_exceeded"
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert_refused(streamed, "jobs")
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before

    # A replay adds no job: it is answered. A job that ends frees its place.
    again = client.post("/v1/jobs", json=BODY, headers={**auth(key), "Idempotency-Key": "first"})
    assert again.status_code == 202 and again.json()["id"] == first
    assert client.post(f"/v1/jobs/{first}/cancel", headers=auth(key)).status_code == 200
    submit(client, key)


# -- waiters at once ----------------------------------------------------------------------


def test_a_key_at_its_waiters_is_refused_for_every_kind_of_wait_and_nothing_is_written(
    client: TestClient, env: dict[str, str], pool: ThreadPoolExecutor
) -> None:
    key, _ = new_key(max_waiters=1)
    job = submit(client, key)
    polling = pool.submit(client.get, f"/v1/jobs/{job}", params={"wait": 30}, headers=auth(key))
    wait_until(lambda: held_waiters(client) == 1, 5, what="the long-poll waiting")
    before = row_counts(env["TIERQ_DATABASE_URL"])

    assert_refused(client.get(f"/v1/jobs/{job}?wait=5", headers=auth(key)), "waiters")
    assert_refused(client.get(f"/v1/jobs/{job}/events", headers=auth(key)), "waiters")
    for body in (CHAT, {**CHAT, "stream": True}):
        assert_refused(client.post("/v1/chat/completions", json=body, headers=auth(key)), "waiters")
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before
    assert client.get(f"/v1/jobs/{job}", headers=auth(key)).status_code == 200  # no wait

    end_job(job)
    assert polling.result(timeout=10).json()["status"] == "succeeded"
    # The long-poll gave its place back: the next one is accepted.
    assert client.get(f"/v1/jobs/{job}?wait=1", headers=auth(key)).status_code == 200


def test_refusals_are_counted_in_metrics_by_limit(client: TestClient) -> None:
    from tests.test_metrics import delta, scrape

    key, _ = new_key(rps=1, max_jobs=1)
    before = scrape(client)
    submit(client, key)
    assert_refused(client.post("/v1/jobs", json=BODY, headers=auth(key)), "jobs")
    assert_refused(client.get("/v1/jobs", headers=auth(key)), "rps")
    after = scrape(client)
    name = "tierq_key_limit_refusals_total"
    assert delta(before, after, name, limit="jobs") == 1
    assert delta(before, after, name, limit="rps") == 1
    assert delta(before, after, name, limit="waiters") == 0


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


# -- setting a key's limits ---------------------------------------------------------------


def test_keys_create_stores_the_keys_own_limits(env: dict[str, str]) -> None:
    from sqlalchemy import select

    from cli.main import main
    from tierq.db import session_scope
    from tierq.keys import hash_key
    from tierq.models import ApiKey

    options = ["--rps", "2.5", "--max-jobs", "3", "--max-waiters", "0"]
    result = CliRunner().invoke(main, ["keys", "create", "limited", *options])
    assert result.exit_code == 0, result.output
    key = result.output.splitlines()[0]
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert (row.rps, row.max_jobs, row.max_waiters) == (2.5, 3, 0)
    refused = CliRunner().invoke(main, ["keys", "create", "bad", "--max-jobs", "-1"])
    assert refused.exit_code != 0
