"""Webhooks: signed (Standard Webhooks), written to an outbox in the transaction that ends
or parks the job, delivered on their own queue with retries, refused for private targets.

The first tests run the API in-process and call the delivery step directly; the last ones
run real processes (API, beat, tier workers, the webhooks worker) against a receiver in
this process that is down for its first requests.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from standardwebhooks import Webhook

from tests.services import free_port, wait_until
from tests.stack import pg_connect

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
PUBLIC = "https://93.184.215.14/hooks/tierq"  # a public literal address: no DNS in tests
FAST = {
    "TIERQ_WEBHOOK_ALLOW_PRIVATE": "true",
    "TIERQ_WEBHOOK_BACKOFF_BASE": "0.2",
    "TIERQ_WEBHOOK_BACKOFF_CAP": "1",
    "TIERQ_WEBHOOK_LEASE_SECONDS": "5",
    "TIERQ_WEBHOOK_REPUBLISH_AFTER": "3",
    "TIERQ_WEBHOOK_TIMEOUT": "3",
}


# -- a receiver that is down for its first requests --------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A webhook receiver on loopback: 503 for its first ``fail_first`` requests (or a
    redirect to ``redirect_to``), then 200. Not listening until ``listen``."""

    fail_first: int = 0
    redirect_to: str | None = None
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    server: ThreadingHTTPServer | None = None

    def acknowledged(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.answered == 200]

    def listen(self, port: int = 0) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _answer(self) -> int:
        if self.redirect_to:
            return 302
        return 503 if len(self.requests) < self.fail_first else 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with state.lock:
                    code = state._answer()
                    state.requests.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, code)
                    )
                self.send_response(code)
                if code == 302:
                    self.send_header("location", state.redirect_to or "")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    state.listen()
    yield state
    state.close()


# -- in-process: the API and the delivery step -------------------------------------------


@pytest.fixture
def client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from api.app import create_app

    monkeypatch.delenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", raising=False)
    with TestClient(create_app()) as test_client:
        yield test_client


@dataclass(frozen=True)
class Key:
    key: str
    secret: str
    headers: dict[str, str]


def new_key(webhook_url: str | None = None) -> Key:
    from tierq.db import session_scope
    from tierq.keys import create_key

    with session_scope() as session:
        created = create_key(session, "webhooks", webhook_url=webhook_url)
    return Key(created.key, created.webhook_secret, {"Authorization": f"Bearer {created.key}"})


def counts(url: str) -> tuple[int, ...]:
    with pg_connect(url) as conn:
        return tuple(
            conn.execute(
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM turns), "
                "(SELECT count(*) FROM webhook_deliveries)"
            ).fetchone()
        )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://2130706433/hook", "loopback"),  # 127.0.0.1 written as one number
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://100.64.0.1/hook", "non-public"),
        ("ftp://93.184.215.14/hook", "http:// or https://"),
        ("https://user:pw@93.184.215.14/hook", "credentials"),
        ("not a url", "http:// or https://"),
    ],
)
def test_unsafe_webhook_url_is_a_422_naming_the_field_and_writes_nothing(
    client: TestClient, env: dict[str, str], url: str, why: str
) -> None:
    key = new_key()
    before = counts(env["TIERQ_DATABASE_URL"])
    response = client.post("/v1/jobs", json={**BODY, "webhook_url": url}, headers=key.headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert [e["field"] for e in problem["errors"]] == ["webhook_url"], problem
    assert why in problem["errors"][0]["message"], problem
    assert counts(env["TIERQ_DATABASE_URL"]) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", BODY),
        ("/v1/chat/completions", BODY),
        ("/v1/chat/completions", {**BODY, "stream": True}),
    ],
)
def test_a_name_that_resolves_to_a_private_address_is_a_422_naming_the_field(
    client: TestClient, env: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    key = new_key()
    before = counts(env["TIERQ_DATABASE_URL"])
    response = client.post(
        path, json={**body, "webhook_url": "http://localhost:9/hook"}, headers=key.headers
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert [e["field"] for e in problem["errors"]] == ["webhook_url"], problem
    assert "resolves to" in problem["detail"] and "loopback" in problem["detail"], problem
    if path == "/v1/chat/completions":
        assert problem["error"]["param"] == "webhook_url"  # what the OpenAI SDK shows
    conversation = client.post("/v1/conversations", json={}, headers=key.headers).json()["id"]
    message = client.post(
        f"/v1/conversations/{conversation}/messages",
        json={**BODY, "webhook_url": "http://localhost:9/hook"},
        headers=key.headers,
    )
    assert message.status_code == 422 and message.json()["errors"][0]["field"] == "webhook_url"
    assert counts(env["TIERQ_DATABASE_URL"])[:2] == before[:2]  # no job, no turn


SLOW_NAME = "slow-dns.tierq.test"  # stands for a name server that takes its time


def test_waiting_for_dns_does_not_stall_other_requests(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from tierq.webhooks import webhook_settings

    resolving = threading.Event()
    slow = webhook_settings().resolve_timeout * 0.75  # answers, but just in time
    real_getaddrinfo = socket.getaddrinfo

    def slow_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != SLOW_NAME:
            return real_getaddrinfo(host, *args, **kwargs)
        resolving.set()
        time.sleep(slow)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    key = new_key()
    submitted: list[Any] = []
    body = {**BODY, "webhook_url": f"http://{SLOW_NAME}/hook"}
    submit = threading.Thread(
        target=lambda: submitted.append(client.post("/v1/jobs", json=body, headers=key.headers))
    )
    submit.start()
    assert resolving.wait(10)
    started = time.monotonic()
    assert client.get("/health/live").status_code == 200
    served_in = time.monotonic() - started
    submit.join(10)
    assert served_in < slow / 2, served_in  # not queued behind the name lookup
    assert submitted[0].status_code == 422
    assert submitted[0].json()["errors"][0]["field"] == "webhook_url"
    assert "10.9.8.7" in submitted[0].json()["detail"]


def test_private_receiver_allowed_when_configured(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    monkeypatch.setenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", "true")
    body = {**BODY, "webhook_url": "http://127.0.0.1:9/hook"}
    accepted = client.post("/v1/jobs", json=body, headers=key.headers)
    assert accepted.status_code == 202 and accepted.json()["webhook_url"] == body["webhook_url"]
    # still only http(s), even then
    ftp = client.post("/v1/jobs", json={**BODY, "webhook_url": "ftp://x/"}, headers=key.headers)
    assert ftp.status_code == 422


def test_event_is_written_with_the_transition_once_and_matches_the_api(
    client: TestClient, env: dict[str, str]
) -> None:
    from tierq.db import session_scope
    from tierq.events import notify_job_changed
    from tierq.models import WebhookDelivery

    key = new_key()
    job = client.post("/v1/jobs", json={**BODY, "webhook_url": PUBLIC}, headers=key.headers)
    assert job.status_code == 202 and job.json()["webhook_url"] == PUBLIC
    job_id = job.json()["id"]
    # a job that has not ended announces nothing
    assert client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"] == []
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).status_code == 200
    with session_scope() as session:
        notify_job_changed(session, job_id)  # the same transition reported again
        rows = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == uuid.UUID(job_id))
        ).all()
    assert [r.id for r in rows] == [f"msg_{uuid.UUID(job_id).hex}_cancelled"]
    payload = json.loads(rows[0].payload)
    assert payload["type"] == "job.cancelled"
    # tierq builds the payload without importing api: it is exactly what the API shows
    assert payload["data"] == client.get(f"/v1/jobs/{job_id}", headers=key.headers).json()
    listed = client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"]
    assert [(d["id"], d["type"], d["status"], d["url"]) for d in listed] == [
        (rows[0].id, "job.cancelled", "pending", PUBLIC)
    ]
    assert listed[0]["next_attempt_at"] is not None and listed[0]["attempts"] == 0
    # another key sees neither the deliveries nor may redeliver them
    other = new_key()
    assert client.get(f"/v1/jobs/{job_id}/deliveries", headers=other.headers).status_code == 404
    redeliver = f"/v1/jobs/{job_id}/deliveries/{rows[0].id}/redeliver"
    assert client.post(redeliver, headers=other.headers).status_code == 404


def test_the_keys_default_url_is_used_and_a_jobs_own_url_wins(
    client: TestClient, env: dict[str, str]
) -> None:
    from tierq.db import session_scope
    from tierq.models import WebhookDelivery

    default = "https://93.184.215.15/default"
    key = new_key(webhook_url=default)
    plain = client.post("/v1/jobs", json=BODY, headers=key.headers).json()["id"]
    own = client.post("/v1/jobs", json={**BODY, "webhook_url": PUBLIC}, headers=key.headers)
    own_id = own.json()["id"]
    for job_id in (plain, own_id):
        client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers)
    with session_scope() as session:
        urls = dict(
            session.execute(
                select(WebhookDelivery.job_id, WebhookDelivery.url).where(
                    WebhookDelivery.job_id.in_([uuid.UUID(plain), uuid.UUID(own_id)])
                )
            ).all()
        )
    assert urls == {uuid.UUID(plain): default, uuid.UUID(own_id): PUBLIC}
    # a job of a key with no URL at all writes no delivery
    bare = new_key()
    job_id = client.post("/v1/jobs", json=BODY, headers=bare.headers).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=bare.headers)
    assert client.get(f"/v1/jobs/{job_id}/deliveries", headers=bare.headers).json()["data"] == []


def test_keys_create_shows_the_webhook_secret_once_and_checks_the_default_url(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main
    from tierq.db import session_scope
    from tierq.keys import hash_key
    from tierq.models import ApiKey

    monkeypatch.delenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", raising=False)
    result = CliRunner().invoke(main, ["keys", "create", "cli", "--webhook-url", PUBLIC])
    assert result.exit_code == 0, result.output
    key, secret_line = result.output.strip().splitlines()
    label, secret = secret_line.split(": ")
    assert label == "webhook secret" and secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    assert row is not None and row.webhook_secret == secret and row.default_webhook_url == PUBLIC
    refused = CliRunner().invoke(
        main, ["keys", "create", "bad", "--webhook-url", "http://169.254.169.254/"]
    )
    assert refused.exit_code != 0 and "link-local" in refused.output


def test_delivery_retries_with_backoff_then_delivers_and_a_duplicate_posts_nothing(
    client: TestClient, env: dict[str, str], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierq.db import session_scope
    from tierq.models import WebhookDelivery
    from tierq.webhooks import WebhookSettings
    from worker.webhook_delivery import deliver

    monkeypatch.setenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", "true")
    settings = WebhookSettings(allow_private=True, backoff_base=0.2, backoff_cap=0.4)
    receiver.fail_first = 2
    key = new_key()
    body = {**BODY, "webhook_url": receiver.url}
    job_id = client.post("/v1/jobs", json=body, headers=key.headers).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers)
    delivery_id = f"msg_{uuid.UUID(job_id).hex}_cancelled"

    assert deliver(delivery_id, settings) == "pending"  # 503
    assert deliver(delivery_id, settings) is None  # not due yet: nothing is posted
    assert len(receiver.requests) == 1
    time.sleep(0.45)
    assert deliver(delivery_id, settings) == "pending"  # 503 again
    time.sleep(0.45)
    assert deliver(delivery_id, settings) == "delivered"
    assert deliver(delivery_id, settings) is None  # a second message for it posts nothing
    assert [r.answered for r in receiver.requests] == [503, 503, 200]
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery_id}
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes every time
    for request in receiver.requests:
        event = Webhook(key.secret).verify(request.body, request.headers)
        assert event["type"] == "job.cancelled" and event["data"]["id"] == job_id
    with pytest.raises(Exception, match="signature"):
        Webhook(new_key().secret).verify(receiver.requests[0].body, receiver.requests[0].headers)

    listed = client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"]
    assert len(listed) == 1
    shown = listed[0]
    assert shown["status"] == "delivered" and shown["attempts"] == 3
    assert shown["last_status_code"] == 200 and shown["next_attempt_at"] is None
    assert [a["status_code"] for a in shown["attempt_log"]] == [503, 503, 200]
    assert shown["attempt_log"][0]["error"] == "HTTP 503"

    # redeliver: same webhook-id, due now
    again = client.post(
        f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", headers=key.headers
    )
    assert again.status_code == 202 and again.json()["status"] == "pending"
    assert deliver(delivery_id, settings) == "delivered"
    assert receiver.requests[-1].headers["webhook-id"] == delivery_id
    missing = client.post(f"/v1/jobs/{job_id}/deliveries/msg_nope/redeliver", headers=key.headers)
    assert missing.status_code == 404

    # past its retry window, a failing delivery ends failed
    receiver.fail_first = 10**6
    client.post(f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", headers=key.headers)
    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(expires_at=func.now())
        )
    assert deliver(delivery_id, settings) == "failed"
    shown = client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"][0]
    assert shown["status"] == "failed" and shown["attempts"] == 5


def test_delivery_time_check_refuses_a_private_target_without_contacting_it(
    client: TestClient, env: dict[str, str], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierq.webhooks import WebhookSettings
    from worker.webhook_delivery import deliver

    monkeypatch.setenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", "true")  # allowed when submitted…
    key = new_key()
    body = {**BODY, "webhook_url": receiver.url}
    job_id = client.post("/v1/jobs", json=body, headers=key.headers).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers)
    delivery_id = f"msg_{uuid.UUID(job_id).hex}_cancelled"
    # …but not any more when delivered
    assert deliver(delivery_id, WebhookSettings(allow_private=False)) == "pending"
    assert receiver.requests == []
    shown = client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"][0]
    assert shown["last_status_code"] is None
    assert "refused: 127.0.0.1 is a loopback address" in shown["last_error"]


@pytest.mark.parametrize("where", ["metadata", "another receiver"])
def test_a_redirect_is_not_followed_and_the_attempt_is_logged(
    client: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A receiver may answer 302 to anywhere (the cloud metadata service, a private host):
    the redirect is a failed attempt, never a second request."""
    from tierq.webhooks import WebhookSettings
    from worker.webhook_delivery import deliver

    monkeypatch.setenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", "true")
    bystander = Receiver()
    bystander.listen()
    try:
        receiver.redirect_to = (
            "http://169.254.169.254/latest/meta-data/" if where == "metadata" else bystander.url
        )
        key = new_key()
        body = {**BODY, "webhook_url": receiver.url}
        job_id = client.post("/v1/jobs", json=body, headers=key.headers).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers)
        delivery_id = f"msg_{uuid.UUID(job_id).hex}_cancelled"
        started = time.monotonic()
        assert deliver(delivery_id, WebhookSettings(allow_private=True, timeout=3)) == "pending"
        assert time.monotonic() - started < 3  # no attempt to reach the redirect target
    finally:
        bystander.close()
    assert [r.answered for r in receiver.requests] == [302]
    assert bystander.requests == []
    shown = client.get(f"/v1/jobs/{job_id}/deliveries", headers=key.headers).json()["data"][0]
    assert shown["status"] == "pending" and shown["attempts"] == 1
    assert [a["status_code"] for a in shown["attempt_log"]] == [302]
    assert shown["attempt_log"][0]["error"] == "HTTP 302"


def test_non_public_addresses() -> None:
    from tierq.webhook_urls import _non_public

    for address, reason in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("172.16.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::", "unspecified"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ]:
        assert _non_public(ipaddress.ip_address(address)) == reason, address
    for address in ("93.184.215.14", "2606:4700::1111", "8.8.8.8"):
        assert _non_public(ipaddress.ip_address(address)) is None, address


def test_delivery_connects_to_the_checked_address() -> None:
    from tierq.webhook_urls import UnsafeWebhookURL, pin
    from tierq.webhooks import WebhookSettings

    pinned = pin("https://93.184.215.14:8443/a/b?c=d", WebhookSettings())
    assert pinned.url == "https://93.184.215.14:8443/a/b?c=d"
    assert pinned.headers == {"host": "93.184.215.14:8443"}
    local = pin("http://localhost:8080/x", WebhookSettings(allow_private=True))
    assert local.url in ("http://127.0.0.1:8080/x", "http://[::1]:8080/x")
    assert local.headers == {"host": "localhost:8080"} and local.extensions == {}
    named = pin("https://localhost/x", WebhookSettings(allow_private=True))
    assert named.extensions == {"sni_hostname": "localhost"}  # TLS checks the name, not the IP
    with pytest.raises(UnsafeWebhookURL, match="loopback"):
        pin("http://localhost:8080/x", WebhookSettings(allow_private=False))


# -- real processes ----------------------------------------------------------------------


def _secret(database_url: str, key: str) -> str:
    from tierq.db import make_engine
    from tierq.keys import hash_key
    from tierq.models import ApiKey

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                select(ApiKey.webhook_secret).where(ApiKey.key_hash == hash_key(key))
            )
    finally:
        engine.dispose()


@pytest.fixture
def unreachable_receiver() -> Iterator[Receiver]:
    """A receiver whose port nobody listens on (connections refused) until it ``listen``s
    on it; then it answers 503 to its first two requests."""
    state = Receiver(fail_first=2)
    state.url = f"http://127.0.0.1:{free_port()}/hook"
    yield state
    state.close()


@pytest.mark.slow
def test_receiver_down_then_back_gets_every_event_signed(
    tmp_path: Path, unreachable_receiver: Receiver
) -> None:
    """Parked, cancelled and succeeded jobs, while the receiver is unreachable at first,
    then up but answering 503, then well."""
    from tests.deployment import deployment
    from tests.test_failover import parking_config

    receiver = unreachable_receiver
    with deployment(tmp_path, config=parking_config) as d:
        d.stack.env.update(FAST)
        secret = _secret(d.database_url, d.key)
        d.stack.api()
        d.stack.spawn("beat", "beat")
        for name in ("gpu", "cpu", "webhooks"):
            d.stack.worker(name)
        for sim in ("gpu-sim", "cpu-sim"):
            d.fault(sim, mode="error_500")
        with d.client() as client:
            body = {"webhook_url": receiver.url}
            kept = d.submit(client, "keep me", **body).json()["id"]
            dropped = d.submit(client, "cancel me", **body).json()["id"]
            wait_until(
                lambda: (
                    {client.get(f"/v1/jobs/{i}").json()["status"] for i in (kept, dropped)}
                    == {"parked"}
                ),
                40,
                0.3,
                what="both jobs parked",
            )

            def refused() -> list[dict[str, Any]]:
                return [
                    a
                    for i in (kept, dropped)
                    for d in client.get(f"/v1/jobs/{i}/deliveries").json()["data"]
                    for a in d["attempt_log"]
                    if a["status_code"] is None
                ]

            # Both parked events tried, and retried, against a closed port.
            wait_until(lambda: len(refused()) >= 3, 30, 0.2, what="refused deliveries")
            assert all("ConnectError" in a["error"] for a in refused()), refused()
            assert receiver.requests == []
            receiver.listen(int(receiver.url.split(":")[2].split("/")[0]))  # back, same URL
            assert client.post(f"/v1/jobs/{dropped}/cancel").status_code == 200
            for sim in ("gpu-sim", "cpu-sim"):
                d.fault(sim, mode="ok")
            wait_until(
                lambda: (
                    client.get(f"/v1/jobs/{kept}", params={"wait": 5}).json()["status"]
                    == "succeeded"
                ),
                60,
                0,
                what="the kept job answered after the outage",
            )

            def announced() -> set[tuple[str, str]]:
                return {
                    (json.loads(r.body)["data"]["id"], json.loads(r.body)["type"])
                    for r in receiver.acknowledged()
                }

            expected = {
                (kept, "job.parked"),
                (kept, "job.succeeded"),
                (dropped, "job.parked"),
                (dropped, "job.cancelled"),
            }
            wait_until(lambda: expected <= announced(), 40, 0.2, what="every event delivered")

            def deliveries() -> list[list[dict[str, Any]]]:
                return [
                    client.get(f"/v1/jobs/{i}/deliveries").json()["data"] for i in (kept, dropped)
                ]

            # the worker records each 200 just after the receiver has answered it
            wait_until(
                lambda: {d["status"] for log in deliveries() for d in log} == {"delivered"},
                10,
                0.1,
                what="every delivery logged",
            )
            requests = list(receiver.requests)
            assert [r.answered for r in requests[:2]] == [503] * 2
            for request in requests:
                event = Webhook(secret).verify(request.body, request.headers)
                assert event["data"]["status"] == event["type"].removeprefix("job.")
            # every event acknowledged once; a retried event kept its id and its bytes
            acked = [r.headers["webhook-id"] for r in receiver.acknowledged()]
            assert len(acked) == len(set(acked))
            for request in requests:
                if request.answered == 503:
                    retried = [
                        r
                        for r in receiver.acknowledged()
                        if r.headers["webhook-id"] == request.headers["webhook-id"]
                    ]
                    assert [r.body for r in retried] == [request.body]

            # the deliveries endpoint tells the same story as the receiver
            logs = deliveries()
            shown = [d for log in logs for d in log]
            unanswered = refused()
            assert sum(d["attempts"] for d in shown) == len(requests) + len(unanswered)
            codes = sorted(a["status_code"] or 0 for d in shown for a in d["attempt_log"])
            assert codes == sorted([0] * len(unanswered) + [r.answered for r in requests])

            # redeliver: the same webhook-id once more
            succeeded = next(d for d in logs[0] if d["type"] == "job.succeeded")
            again = client.post(f"/v1/jobs/{kept}/deliveries/{succeeded['id']}/redeliver")
            assert again.status_code == 202, again.text
            wait_until(
                lambda: len(receiver.requests) == len(requests) + 1, 20, 0.1, what="redelivery"
            )
            last = receiver.requests[-1]
            assert last.headers["webhook-id"] == succeeded["id"]
            assert Webhook(secret).verify(last.body, last.headers)["type"] == "job.succeeded"
            wait_until(
                lambda: (
                    next(
                        d
                        for d in client.get(f"/v1/jobs/{kept}/deliveries").json()["data"]
                        if d["id"] == succeeded["id"]
                    )["attempts"]
                    == succeeded["attempts"] + 1
                ),
                10,
                0.1,
                what="redelivery logged",
            )


@pytest.mark.slow
def test_zero_install_default_delivers_to_the_keys_default_url(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite and the folder broker; the URL comes from the key, not the job."""
    from sqlalchemy.orm import Session

    from tests.deployment import deployment
    from tierq.db import make_engine
    from tierq.keys import create_key

    receiver.fail_first = 1
    monkeypatch.setenv("TIERQ_WEBHOOK_ALLOW_PRIVATE", "true")  # for create_key's check
    with deployment(tmp_path, "sqlite-filesystem") as d:
        d.stack.env.update(FAST)
        engine = make_engine(d.database_url)
        with Session(engine) as session, session.begin():
            created = create_key(session, "hooked", webhook_url=receiver.url)
        engine.dispose()
        d.key = created.key
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("webhooks")
        with d.client() as client:
            job_id = d.submit(client, "announce me").json()["id"]
            assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == (
                "succeeded"
            )
            wait_until(lambda: receiver.acknowledged(), 30, 0.1, what="the webhook")

            def shown() -> list[tuple[str, int, str]]:
                data = client.get(f"/v1/jobs/{job_id}/deliveries").json()["data"]
                return [(d["status"], d["attempts"], d["url"]) for d in data]

            # the worker records the 200 just after the receiver has answered it
            wait_until(lambda: shown()[0][0] == "delivered", 10, 0.1, what="delivery logged")
            assert shown() == [("delivered", 2, receiver.url)]
        [ack] = receiver.acknowledged()
        event = Webhook(created.webhook_secret).verify(ack.body, ack.headers)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        assert event["data"]["result"]["choices"][0]["message"]["content"]
        assert [r.answered for r in receiver.requests] == [503, 200]
