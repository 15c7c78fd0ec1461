"""The API against real Postgres and Redis (no worker: jobs stay queued)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event

from tests.stack import pg_connect

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def row_counts(url: str) -> tuple[int, int, int]:
    with pg_connect(url) as conn:
        return tuple(
            conn.execute(  # type: ignore[return-value]
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM turns), "
                "(SELECT count(*) FROM conversations)"
            ).fetchone()
        )


def test_submit_is_accepted_and_durable(client: TestClient, api_key: str, env: dict) -> None:
    response = client.post("/v1/jobs", json=BODY, headers=auth(api_key))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["served_by"]["tier"] == "gpu"
    with pg_connect(env["TIERQ_DATABASE_URL"]) as conn:
        status, seq = conn.execute(
            "SELECT status, answer_seq FROM jobs WHERE id = %s", (job["id"],)
        ).fetchone()
        turns = conn.execute(
            "SELECT seq, role, content FROM turns WHERE conversation_id = %s",
            (job["conversation_id"],),
        ).fetchall()
    assert status == "queued" and seq == 1
    assert turns == [(0, "user", "hello")]
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=auth(api_key)).json()
    assert fetched["id"] == job["id"]


def test_missing_or_wrong_key_is_401(client: TestClient) -> None:
    for headers in ({}, auth("tq_nope"), {"Authorization": "Basic abc"}):
        response = client.post("/v1/jobs", json=BODY, headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_key_never_sees_another_keys_rows(client: TestClient, api_key: str, env: dict) -> None:
    from tierq.db import session_scope
    from tierq.keys import create_key

    with session_scope() as session:
        other = create_key(session, "other").key
    job = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(other)).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(other)).status_code == 404
    conversation = f"/v1/conversations/{job['conversation_id']}"
    assert client.get(conversation, headers=auth(other)).status_code == 404
    assert (
        client.post(f"{conversation}/messages", json=BODY, headers=auth(other)).status_code == 404
    )
    listed = client.get("/v1/jobs", headers=auth(other)).json()["data"]
    assert job["id"] not in {j["id"] for j in listed}


def test_idempotency_key(client: TestClient, api_key: str, env: dict) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4()), **auth(api_key)}
    first = client.post("/v1/jobs", json=BODY, headers=key)
    again = client.post("/v1/jobs", json=BODY, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    before = row_counts(env["TIERQ_DATABASE_URL"])
    changed = client.post("/v1/jobs", json={**BODY, "model": "other"}, headers=key)
    assert changed.status_code == 422
    assert changed.json()["errors"][0]["field"] == "Idempotency-Key"
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": BODY["messages"]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "temperature": 9}, "temperature"),
        ({**BODY, "priority": 1000}, "priority"),
        ({**BODY, "deadline": "2030-01-01T00:00:00"}, "deadline"),
        ({**BODY, "on_exhausted": "panic"}, "on_exhausted"),
        ({**BODY, "top_k": "a\u0000"}, "top_k"),  # an extra is passed on, but must be storable
        ({**BODY, "stop": "\ud800"}, "stop"),  # a lone surrogate cannot be sent as UTF-8
        ({**BODY, "user": "x\udfff"}, "user"),
        ({**BODY, "tools": [{"type": "nope"}]}, "tools.0.type"),
        ({**BODY, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({**BODY, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({**BODY, "logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
                        ],
                    }
                ],
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "42"}]},
            "messages.0.tool_call_id",
        ),
        ({**BODY, "conversation_id": "not-a-uuid"}, "conversation_id"),
        ({**BODY, "conversation_id": str(uuid.uuid4())}, "conversation_id"),
        ({**BODY, "deadline": "0001-01-01T00:00:00+14:00"}, "deadline"),  # before year 1 in UTC
        (
            {"model": "m", "messages": [{"role": "user", "content": "a\u0000b"}]},
            "messages.0.content",
        ),
        ({**BODY, "stop": ["ok", "\u0000"]}, "stop.1"),
        ({**BODY, "deadline": "2020-01-01T00:00:00Z"}, "deadline"),  # in the past
        ({**BODY, "deadline": "2020-01-01T02:00:00+02:00"}, "deadline"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 1001}, "messages"),
    ],
)
def test_bad_input_is_a_problem_naming_the_field_and_writes_nothing(
    client: TestClient, api_key: str, env: dict, body: dict, field: str
) -> None:
    before = row_counts(env["TIERQ_DATABASE_URL"])
    # As JSON with \u escapes: a lone surrogate has no UTF-8 form, a client sends it escaped.
    headers = {**auth(api_key), "content-type": "application/json"}
    response = client.post("/v1/jobs", content=json.dumps(body), headers=headers)
    assert response.status_code in (404, 422)
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == response.status_code
    assert any(e["field"] == field for e in problem["errors"]), problem
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


def test_malformed_json_is_a_problem(client: TestClient, api_key: str) -> None:
    response = client.post(
        "/v1/jobs",
        content=b"{not json",
        headers={**auth(api_key), "Content-Type": "application/json"},
    )
    assert response.status_code == 400  # no field to name: the body is not JSON at all
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] == [
        {"field": "body", "message": "not valid JSON: Expecting property name enclosed in "
         "double quotes (line 1, column 2)"}
    ]  # fmt: skip


def test_conversation_messages_keep_order_while_a_job_is_pending(
    client: TestClient, api_key: str, env: dict
) -> None:
    created = client.post("/v1/conversations", json={"system": "be brief"}, headers=auth(api_key))
    assert created.status_code == 201
    conversation = created.json()["id"]
    first = client.post(
        f"/v1/conversations/{conversation}/messages", json=BODY, headers=auth(api_key)
    ).json()
    second = client.post(
        f"/v1/conversations/{conversation}/messages",
        json={**BODY, "messages": [{"role": "user", "content": "and then?"}]},
        headers=auth(api_key),
    ).json()
    view = client.get(f"/v1/conversations/{conversation}", headers=auth(api_key)).json()
    assert [(t["seq"], t["role"]) for t in view["turns"]] == [
        (0, "system"),
        (1, "user"),
        (3, "user"),
    ]  # 2 is reserved for the first answer
    assert view["pending_jobs"] == [first["id"], second["id"]]
    with pg_connect(env["TIERQ_DATABASE_URL"]) as conn:
        after, published = conn.execute(
            "SELECT after_job_id::text, published_at FROM jobs WHERE id = %s", (second["id"],)
        ).fetchone()
    assert after == first["id"] and published is None  # waits for the first job to end


def test_cancel_and_list_with_cursor(client: TestClient, env: dict) -> None:
    from tierq.db import session_scope
    from tierq.keys import create_key

    with session_scope() as session:
        key = create_key(session, "lister").key
    ids = [client.post("/v1/jobs", json=BODY, headers=auth(key)).json()["id"] for _ in range(5)]
    cancelled = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key)).status_code == 409
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=auth(key)).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    queued = client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth(key)).json()
    assert [j["id"] for j in queued["data"]] == [ids[0]]
    bad = client.get("/v1/jobs", params={"cursor": "zzz"}, headers=auth(key))
    assert bad.status_code == 422


def test_long_poll_returns_at_the_limit_for_an_unfinished_job(
    client: TestClient, api_key: str
) -> None:
    import time

    job = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()
    started = time.monotonic()
    polled = client.get(f"/v1/jobs/{job['id']}", params={"wait": 1}, headers=auth(api_key))
    assert polled.json()["status"] == "queued"
    assert 0.9 < time.monotonic() - started < 3
    too_long = client.get(f"/v1/jobs/{job['id']}", params={"wait": 61}, headers=auth(api_key))
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["field"] == "wait"


# --- races between a reader and a committing worker, made deterministic ---------------


@contextmanager
def on_statement(
    matching: str, action: Callable[[], None], when: str = "after"
) -> Iterator[threading.Event]:
    """Run ``action`` once, right ``when`` (before or after) the first statement containing
    ``matching`` runs on tierq's engine: the commit a worker might make at that moment."""
    from tierq.db import get_engine

    engine = get_engine()
    fired = threading.Event()

    def hook(*args: object) -> None:
        if matching in str(args[2]) and not fired.is_set():
            fired.set()  # first: the action's own statements must not fire it again
            action()

    sa_event.listen(engine, f"{when}_cursor_execute", hook)
    try:
        yield fired
    finally:
        sa_event.remove(engine, f"{when}_cursor_execute", hook)


LOAD_JOB = "FROM jobs \nWHERE jobs.id"  # api.routes.jobs.load_job, and nothing else


def end_job(job_id: str, values: dict[str, object] | None = None, **detail: object) -> None:
    """What a worker's answer does to a job, in one transaction: status, event, notify."""
    from sqlalchemy import update

    from tierq.db import db_now, session_scope
    from tierq.events import notify_job_changed, record_event
    from tierq.models import Job

    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status="succeeded", finished_at=db_now(), updated_at=db_now(), **(values or {}))
        )
        record_event(session, job_id, "answered", **detail)
        notify_job_changed(session, job_id)


def test_long_poll_hears_an_end_that_commits_while_it_reads_the_job(
    client: TestClient, api_key: str
) -> None:
    from api.waiters import SAFETY_RECHECK

    job_id = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()["id"]
    waiters = client.app.state.waiters  # type: ignore[attr-defined]

    def end_and_wait_for_the_notification() -> None:
        end_job(job_id)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if any(e.is_set() for e in waiters._events.get(job_id, ())):
                return
            time.sleep(0.01)

    with on_statement(LOAD_JOB, end_and_wait_for_the_notification) as fired:
        started = time.monotonic()
        polled = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}, headers=auth(api_key))
        elapsed = time.monotonic() - started
    assert fired.is_set()
    assert polled.json()["status"] == "succeeded"
    # Woken by the notification, not by the safety re-check that comes SAFETY_RECHECK later.
    assert elapsed < SAFETY_RECHECK - 1


def test_an_unexpected_error_is_a_problem_500_that_reveals_nothing(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An error no handler expects (here: one from the database that is not an outage, and
    one from plain code) is logged with its details and answered with a bare problem."""
    from sqlalchemy import text

    from api.app import create_app
    from tierq.db import session_scope

    app = create_app()

    @app.get("/test/database-error")
    def database_error() -> None:
        with session_scope() as session:
            session.execute(text("SELECT 1 / 0 AS secret_column_name"))

    @app.get("/test/code-error")
    def code_error() -> None:
        raise RuntimeError("s3cr3t-token-in-a-message")

    @app.get("/test/parameter-error")
    def parameter_error() -> None:
        with session_scope() as session:
            session.execute(
                text("SELECT 1 / 0 AS hidden_parameters WHERE :tag <> ''"),
                {"tag": "user-prompt-s3cr3t"},
            )

    with TestClient(app, raise_server_exceptions=False) as client:
        for path, secret in (
            ("/test/database-error", "secret_column_name"),
            ("/test/code-error", "s3cr3t-token-in-a-message"),
        ):
            caplog.clear()
            response = client.get(path)
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["status"] == 500 and problem["title"] == "Internal error"
            assert secret not in response.text and "Traceback" not in response.text
            assert any(
                secret in r.getMessage() or secret in (r.exc_text or "") for r in caplog.records
            )
        # A statement's bound values (prompts, key hashes) stay out of the log entirely.
        caplog.clear()
        assert client.get("/test/parameter-error").status_code == 500
        logged = " ".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert "hidden_parameters" in logged and "user-prompt-s3cr3t" not in logged


DEADLINE_WITH_OFFSET = "2031-06-01T12:00:00+02:00"
DEADLINE_IN_UTC = "2031-06-01T10:00:00Z"


def test_a_deadline_with_an_offset_is_kept_as_the_same_instant(
    client: TestClient, api_key: str
) -> None:
    body = {**BODY, "deadline": DEADLINE_WITH_OFFSET}
    job = client.post("/v1/jobs", json=body, headers=auth(api_key)).json()
    assert job["deadline"] == DEADLINE_IN_UTC
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=auth(api_key)).json()
    assert fetched["deadline"] == DEADLINE_IN_UTC


@pytest.mark.slow
def test_a_deadline_with_an_offset_is_kept_as_the_same_instant_on_sqlite(tmp_path: Path) -> None:
    """SQLite stores a datetime's wall time without its offset: it must be UTC already."""
    import sqlite3

    from tests.deployment import deployment

    with deployment(tmp_path, "sqlite-filesystem") as d:
        d.stack.api()
        with d.client() as http:
            job = d.submit(http, deadline=DEADLINE_WITH_OFFSET).json()
            fetched = http.get(f"/v1/jobs/{job['id']}").json()
        assert fetched["deadline"] == DEADLINE_IN_UTC
        with sqlite3.connect(tmp_path / "tierq.db") as db:
            (stored,) = db.execute(
                "SELECT deadline FROM jobs WHERE id = ?", (uuid.UUID(job["id"]).hex,)
            ).fetchone()
        assert stored.startswith("2031-06-01 10:00:00"), stored
