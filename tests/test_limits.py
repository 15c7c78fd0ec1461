"""Hostile input: request size limits (api/limits.py), malformed JSON, Idempotency-Key and
deadline checks. Every refusal is problem+json naming the field, and writes nothing."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.stack import Process, Stack
from tests.test_api import BODY, auth, row_counts

MIB = 1024 * 1024
MB = 1_000_000


@pytest.fixture
def limits_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set TIERQ_* limits for this test only (the settings are cached per process)."""
    from tierq.settings import get_settings

    def set_limits(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"TIERQ_{name.upper()}", value)
        get_settings.cache_clear()

    yield set_limits
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def assert_problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert any(e["field"] == field for e in problem["errors"]), problem
    return problem


# --- the body limit, before the key is checked -----------------------------------------


def test_a_declared_body_over_the_limit_is_413_before_the_key_is_checked(
    client: TestClient, env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.auth

    lookups: list[str] = []
    monkeypatch.setattr(api.auth, "_load", lambda key, digest: lookups.append(key))
    before = row_counts(env["TIERQ_DATABASE_URL"])
    body = b"x" * (8 * MIB + 1)  # the default limit, plus one byte
    for headers in ({}, auth("tq_not_a_key")):
        response = client.post(
            "/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"}
        )
        problem = assert_problem(response, 413, "body")
        assert "TIERQ_MAX_BODY_BYTES" in problem["detail"]
        assert response.headers["connection"] == "close"  # it would not read the rest
    assert lookups == []
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


def test_the_body_limit_is_a_setting(client: TestClient, api_key: str, limits_env: Any) -> None:
    from api.app import create_app

    limits_env(max_body_bytes="2048")
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 3000}]}
    with TestClient(create_app()) as small:
        assert_problem(small.post("/v1/jobs", json=big, headers=auth(api_key)), 413, "body")
        assert small.post("/v1/jobs", json=BODY, headers=auth(api_key)).status_code == 202
    assert client.post("/v1/jobs", json=big, headers=auth(api_key)).status_code == 202


class Sent:
    """What the middleware sent: the response start and its body."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    def json(self) -> dict[str, Any]:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


def scope(headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


CHUNKED = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}


def limits(app: Any, max_body: int = 4 * MIB, timeout: float = 5.0) -> Any:
    from api.limits import RequestLimits

    return RequestLimits(app, max_body_bytes=max_body, max_header_bytes=16384, body_timeout=timeout)


def test_a_streamed_body_is_refused_once_it_passes_the_limit_having_held_no_more() -> None:
    """Chunked: no Content-Length to judge by, so the bytes are counted as they arrive."""
    pulled = 0

    async def endless() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * MIB, "more_body": True}

    async def app(*_: Any) -> None:
        raise AssertionError("the application saw a body over the limit")

    sent = Sent()
    asyncio.run(limits(app, max_body=4 * MIB)(scope(CHUNKED), endless, sent))
    assert sent.status == 413 and sent.json()["errors"][0]["field"] == "body"
    assert pulled == 5  # 4 MiB is within the limit; the fifth piece passes it


def test_a_body_within_the_limit_reaches_the_app_whole_then_the_servers_messages() -> None:
    pieces = [b'{"a": ', b'"b"', b"}"]
    messages = [
        *({"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(pieces)),
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    seen: list[dict[str, Any]] = []

    async def app(_scope: Any, app_receive: Any, _send: Any) -> None:
        seen.append(await app_receive())
        seen.append(await app_receive())  # a chat route listening for the client leaving

    asyncio.run(limits(app)(scope(CHUNKED), receive, Sent()))
    assert seen == [
        {"type": "http.request", "body": b'{"a": "b"}', "more_body": False},
        {"type": "http.disconnect"},
    ]


def test_a_body_that_trickles_in_is_408() -> None:
    async def slow() -> dict[str, Any]:
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def app(*_: Any) -> None:
        raise AssertionError("the application waited for a slow body")

    sent = Sent()
    started = time.monotonic()
    asyncio.run(limits(app, timeout=0.5)(scope(CHUNKED), slow, sent))
    assert sent.status == 408 and "TIERQ_BODY_TIMEOUT" in sent.json()["detail"]
    assert time.monotonic() - started < 2


def test_a_content_length_that_is_not_a_number_is_400() -> None:
    async def app(*_: Any) -> None:
        raise AssertionError("the application saw a request with no readable length")

    async def unread() -> dict[str, Any]:
        raise AssertionError("the body was read")

    sent = Sent()
    headers = {"Content-Length": "12abc", "Content-Type": "application/json"}
    asyncio.run(limits(app)(scope(headers), unread, sent))
    assert sent.status == 400 and sent.json()["errors"][0]["field"] == "Content-Length"


def test_headers_over_the_limit_are_431(client: TestClient, api_key: str) -> None:
    headers = {**auth(api_key), "X-Padding": "p" * 17_000}  # default limit: 16 KiB
    assert_problem(client.post("/v1/jobs", json=BODY, headers=headers), 431, "headers")
    assert client.get("/health/live", headers={"X-Padding": "p" * 15_000}).status_code == 200


# --- what the body must be ---------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_415(
    client: TestClient, api_key: str, env: dict, content_type: str | None
) -> None:
    before = row_counts(env["TIERQ_DATABASE_URL"])
    headers = {**auth(api_key), **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/v1/jobs", content=json.dumps(BODY), headers=headers)
    problem = assert_problem(response, 415, "Content-Type")
    assert "application/json" in problem["detail"]
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


def test_json_with_a_charset_is_json(client: TestClient, api_key: str) -> None:
    headers = {**auth(api_key), "Content-Type": "Application/JSON; charset=utf-8"}
    assert client.post("/v1/jobs", content=json.dumps(BODY), headers=headers).status_code == 202


@pytest.mark.parametrize(
    ("path", "content", "says"),
    [
        ("/v1/jobs", b'{"model": "m",\n  messages: []}', "line 2, column 3"),
        ("/v1/jobs", b'{"model": "m"', "line 1"),
        ("/v1/jobs", b"\xff\xfe\x00{", "not valid JSON"),  # no encoding json can read
        ("/v1/jobs", b'{"n": ' + b"1" * 5000 + b"}", "not valid JSON"),  # over 4300 digits
        ("/v1/chat/completions", b"{not json", "line 1, column 2"),
        ("/v1/conversations/00000000-0000-0000-0000-000000000000/messages", b"[", "line 1"),
    ],
)
def test_malformed_json_is_400_saying_so(
    client: TestClient, api_key: str, env: dict, path: str, content: bytes, says: str
) -> None:
    before = row_counts(env["TIERQ_DATABASE_URL"])
    headers = {**auth(api_key), "Content-Type": "application/json"}
    problem = assert_problem(client.post(path, content=content, headers=headers), 400, "body")
    assert problem["title"] == "Malformed JSON" and says in problem["detail"], problem
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


# --- the job's own limits ------------------------------------------------------------------


def test_messages_per_request_is_a_setting(
    client: TestClient, api_key: str, env: dict, limits_env: Any
) -> None:
    limits_env(max_messages="3")
    before = row_counts(env["TIERQ_DATABASE_URL"])
    four = {**BODY, "messages": [{"role": "user", "content": str(i)} for i in range(4)]}
    problem = assert_problem(
        client.post("/v1/jobs", json=four, headers=auth(api_key)), 422, "messages"
    )
    assert "TIERQ_MAX_MESSAGES" in problem["detail"]
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before
    three = {**four, "messages": four["messages"][:3]}
    assert client.post("/v1/jobs", json=three, headers=auth(api_key)).status_code == 202


def test_a_job_larger_than_it_may_be_stored_is_422(
    client: TestClient, api_key: str, env: dict, limits_env: Any
) -> None:
    limits_env(max_job_bytes="4096")  # the body limit stays 8 MiB
    before = row_counts(env["TIERQ_DATABASE_URL"])
    big = {**BODY, "messages": [{"role": "user", "content": "é" * 2100}]}  # 4200 bytes
    for path in ("/v1/jobs", "/v1/chat/completions"):
        response = client.post(path, json=big, headers=auth(api_key))
        assert "TIERQ_MAX_JOB_BYTES" in assert_problem(response, 422, "body")["detail"]
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before
    fits = {**BODY, "messages": [{"role": "user", "content": "é" * 1900}]}
    assert client.post("/v1/jobs", json=fits, headers=auth(api_key)).status_code == 202


# --- Idempotency-Key and deadline ------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "\t", "k" * 256, "a\x7fb"])
@pytest.mark.parametrize(
    "path", ["/v1/jobs", "/v1/chat/completions", "/v1/conversations/{conversation}/messages"]
)
def test_an_unusable_idempotency_key_is_422_never_a_500(
    client: TestClient, api_key: str, env: dict, key: str, path: str
) -> None:
    conversation = client.post("/v1/conversations", json={}, headers=auth(api_key)).json()["id"]
    url = path.format(conversation=conversation)
    before = row_counts(env["TIERQ_DATABASE_URL"])
    for _ in range(2):  # the second one was the 500: '' had been stored by the first
        response = client.post(url, json=BODY, headers={**auth(api_key), "Idempotency-Key": key})
        assert_problem(response, 422, "Idempotency-Key")
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before
    kept = {**auth(api_key), "Idempotency-Key": "k" * 255}
    assert client.post("/v1/jobs", json=BODY, headers=kept).status_code == 202


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
def test_a_deadline_in_the_past_is_422(
    client: TestClient, api_key: str, env: dict, path: str
) -> None:
    before = row_counts(env["TIERQ_DATABASE_URL"])
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    response = client.post(path, json={**BODY, "deadline": past}, headers=auth(api_key))
    assert "in the past" in assert_problem(response, 422, "deadline")["detail"]
    assert row_counts(env["TIERQ_DATABASE_URL"]) == before


def test_a_deadline_is_judged_at_the_requests_arrival_however_late_it_is_checked_again() -> None:
    """The chat route validates the request again after a DNS lookup (webhook_url): a
    deadline that passes in between must not turn into a 500 there."""
    from api import limits
    from api.routes.openai_compat import ChatCompletionCreate

    token = limits._ARRIVED.set(datetime.now(UTC))
    try:
        soon = (datetime.now(UTC) + timedelta(seconds=0.2)).isoformat()
        body = ChatCompletionCreate.model_validate({**BODY, "deadline": soon})
        time.sleep(0.3)
        assert body.job().deadline == body.deadline
    finally:
        limits._ARRIVED.reset(token)


# --- the real API process: a 100 MB body costs it no memory ----------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the last reset_peak) of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)


def send_body(port: int, total: int, chunked: bool, piece: int = MIB) -> bytes:
    """POST ``total`` bytes to /v1/jobs with no key, chunked or with a Content-Length,
    stopping as soon as the server answers; return what it answered."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = "POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}{framing}\r\n\r\n".encode())
        data = b"x" * piece
        frame = f"{piece:x}\r\n".encode() + data + b"\r\n" if chunked else data
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(frame)
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += piece
        if sent >= total and chunked:
            sock.sendall(b"0\r\n\r\n")
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return answer
        if not chunk:
            return answer
        answer += chunk


@pytest.fixture(scope="module")
def api_process(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, int]]:
    """A real `tierq api` (uvicorn as tierq starts it), idle connections closed after 2 s."""
    stack = Stack(env, tmp_path_factory.mktemp("api"))
    try:
        api = stack.api(TIERQ_API_KEEP_ALIVE="2")
        yield api, int(stack.api_url.rsplit(":", 1)[1])
    finally:
        stack.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_unauthenticated_100_mb_body_costs_the_api_process_under_10_mb(
    api_process: tuple[Process, int], chunked: bool
) -> None:
    api, port = api_process
    # The baseline: RSS after an ordinary request (no key: 401) has warmed the code up.
    assert httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=BODY).status_code == 401
    pid = api.popen.pid
    baseline = memory_kib(pid)["VmRSS"]
    reset_peak(pid)
    answer = send_body(port, 100 * MB, chunked)
    peak_growth = (memory_kib(pid)["VmHWM"] - baseline) * 1024
    said = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    # Both in one message: on code without the limit, how much memory it took. Chunked, it
    # costs the limit (8 MiB, 8.4 MB) and uvicorn's read buffers: 9.0-9.5 MB measured.
    summary = f"{said}; peak RSS grew {peak_growth / MB:.1f} MB"
    assert answer.startswith(b"HTTP/1.1 413") and peak_growth < 10 * MB, summary
    assert b"TIERQ_MAX_BODY_BYTES" in answer
    assert api.alive()


def raw_request(port: int, request: bytes, wait: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        return _read_answer(sock)


def test_the_api_process_bounds_headers_as_they_arrive(api_process: tuple[Process, int]) -> None:
    """uvicorn (h11) stops buffering headers past TIERQ_MAX_HEADER_BYTES; headers that
    arrive in one read reach tierq, which answers 431 itself."""
    api, port = api_process
    get = b"GET /health/live HTTP/1.1\r\nHost: api\r\nConnection: close\r\nX-Pad: "
    huge = raw_request(port, get + b"p" * MIB + b"\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 400"), huge[:200]  # uvicorn's; httptools took it all
    over = raw_request(port, get + b"p" * 17_000 + b"\r\n\r\n")
    assert over.startswith(b"HTTP/1.1 431") and b"TIERQ_MAX_HEADER_BYTES" in over, over[:300]
    assert raw_request(port, get + b"p" * 100 + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert api.alive()


def test_the_api_process_closes_idle_connections_after_the_keep_alive_setting(
    api_process: tuple[Process, int],
) -> None:
    _, port = api_process
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: api\r\n\r\n")
        answer = sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:  # the whole answer, so what follows is the close
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server (75 s without the setting)
        assert 1.5 < time.monotonic() - started < 5
