"""/metrics against real Postgres and Redis (/health/backends: tests/test_health.py).

Other tests share the database, so every assertion on a count compares two scrapes: the
numbers must move by exactly what this test wrote.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.services import RedisServer, free_port
from tests.test_webhooks import receiver  # noqa: F401 (a fixture)

Sample = tuple[str, frozenset[tuple[str, str]]]
Scrape = dict[Sample, float]
STATES = ("closed", "open", "half_open")


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def parse(text: str) -> Scrape:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: TestClient) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


def value(metrics: Scrape, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- writing rows the way workers would -----------------------------------------------


def _owner_and_conversation(session: Any) -> tuple[uuid.UUID, uuid.UUID]:
    from tierq.keys import create_key
    from tierq.models import Conversation

    owner = uuid.UUID(create_key(session, "metrics").id)
    conversation = Conversation(owner_id=owner)
    session.add(conversation)
    session.flush()
    return owner, conversation.id


def add_jobs(*specs: dict[str, Any]) -> list[uuid.UUID]:
    """Insert jobs (status, tier, quality, age_seconds...) and return their ids."""
    from tierq.db import db_now, session_scope
    from tierq.models import Job

    with session_scope() as session:
        owner, conversation = _owner_and_conversation(session)
        ids = []
        for spec in specs:
            fields = dict(spec)
            age = fields.pop("age_seconds", 0)
            job = Job(
                owner_id=owner,
                conversation_id=conversation,
                answer_seq=1,
                request={"messages": []},
                request_hash="x" * 64,
                created_at=db_now(-age),
                **fields,
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
        return ids


def add_rows(*rows: Any) -> None:
    from tierq.db import session_scope

    with session_scope() as session:
        for row in rows:
            session.add(row)
            session.flush()  # in order: transitions need their backend row first


def update_job(job_id: uuid.UUID, **values: Any) -> None:
    from sqlalchemy import update

    from tierq.db import session_scope
    from tierq.models import Job

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


# --- /metrics --------------------------------------------------------------------------


def test_metrics_is_prometheus_text_without_a_key(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert {
        "tierq_jobs",
        "tierq_jobs_finished",
        "tierq_parked_jobs",
        "tierq_oldest_parked_job_age_seconds",
        "tierq_attempts",
        "tierq_backend_latency_seconds",
        "tierq_failovers",
        "tierq_breaker_transitions",
        "tierq_breaker_state",
        "tierq_backend_up",
        "tierq_queue_depth",
        "tierq_broker_up",
        "tierq_database_up",
        "tierq_scrape_errors",
        "tierq_webhook_deliveries",
        "tierq_webhook_delivery_attempts",
        "tierq_oldest_undelivered_webhook_age_seconds",
    } <= families


def test_metrics_needs_the_metrics_key_once_one_is_set(
    env: dict[str, str], api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app
    from tierq.settings import get_settings

    metrics_key = f"mk-{uuid.uuid4().hex}"
    monkeypatch.setenv("TIERQ_METRICS_KEY", metrics_key)
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            for headers in (
                {},
                auth(api_key),
                auth(metrics_key + "x"),
                {"Authorization": metrics_key},
            ):
                refused = client.get("/metrics", headers=headers)
                assert refused.status_code == 401, headers
                assert refused.headers["content-type"] == "application/problem+json"
                assert refused.headers["www-authenticate"] == "Bearer"
                assert "tierq_" not in refused.text
            scraped = client.get("/metrics", headers=auth(metrics_key))
        assert scraped.status_code == 200
        assert "tierq_jobs" in {f.name for f in text_string_to_metric_families(scraped.text)}
    finally:
        monkeypatch.delenv("TIERQ_METRICS_KEY")
        get_settings.cache_clear()


def test_job_counts_move_as_jobs_change_state(client: TestClient) -> None:
    before = scrape(client)
    queued, _, _ = add_jobs(
        {"status": "queued", "tier": "gpu"},
        {"status": "running", "tier": "cpu"},
        {"status": "failed", "tier": "gpu", "error": "bad request"},
    )
    add_jobs(
        {"status": "succeeded", "tier": "gpu", "quality": "full"},
        {"status": "succeeded", "tier": "gpu", "quality": "full"},
        {"status": "succeeded", "tier": "cpu", "quality": "reduced"},
        {"status": "succeeded", "tier": "hosted", "quality": "reduced"},
        {"status": "succeeded", "tier": "hosted", "quality": "static"},
    )
    middle = scrape(client)
    assert delta(before, middle, "tierq_jobs", status="queued", tier="gpu") == 1
    assert delta(before, middle, "tierq_jobs", status="running", tier="cpu") == 1
    assert delta(before, middle, "tierq_jobs", status="succeeded", tier="gpu") == 2
    finished = "tierq_jobs_finished_total"
    assert delta(before, middle, finished, status="succeeded", tier="gpu", quality="full") == 2
    assert delta(before, middle, finished, status="succeeded", tier="cpu", quality="reduced") == 1
    assert (
        delta(before, middle, finished, status="succeeded", tier="hosted", quality="reduced") == 1
    )
    assert delta(before, middle, finished, status="succeeded", tier="hosted", quality="static") == 1
    assert delta(before, middle, finished, status="failed", tier="gpu", quality="none") == 1

    update_job(queued, status="succeeded", quality="full")
    after = scrape(client)
    assert delta(middle, after, "tierq_jobs", status="queued", tier="gpu") == -1
    assert delta(middle, after, finished, status="succeeded", tier="gpu", quality="full") == 1
    assert_sla_matches_finished_counts(after)


def assert_sla_matches_finished_counts(metrics: Scrape) -> None:
    """The SLA gauge agrees with the finished counters of the same scrape (one snapshot)."""
    succeeded = good = 0.0
    for (name, labels), count in metrics.items():
        label = dict(labels)
        if name != "tierq_jobs_finished_total" or label["status"] != "succeeded":
            continue
        succeeded += count
        if label["tier"] in ("gpu", "cpu") and label["quality"] in ("full", "reduced"):
            good += count
    assert succeeded > 0
    assert value(metrics, "tierq_quality_sla_ratio") == pytest.approx(good / succeeded)


def test_parked_count_and_age_of_the_oldest(client: TestClient) -> None:
    before = scrape(client)
    (parked,) = add_jobs({"status": "parked", "tier": "hosted", "age_seconds": 120})
    after = scrape(client)
    assert delta(before, after, "tierq_parked_jobs") == 1
    assert delta(before, after, "tierq_jobs", status="parked", tier="hosted") == 1
    # Measured by the database clock; an older parked job of another test only adds to it.
    assert value(after, "tierq_oldest_parked_job_age_seconds") >= 120

    update_job(parked, status="queued")
    assert delta(after, scrape(client), "tierq_parked_jobs") == -1


def test_no_parked_job_means_age_zero() -> None:
    from datetime import UTC, datetime

    from tierq.metric_queries import _age_seconds

    assert _age_seconds(None, datetime.now(UTC)) == 0.0


def test_attempts_and_latency_histogram(client: TestClient) -> None:
    from tierq.models import Attempt

    (job,) = add_jobs({"status": "running", "tier": "gpu"})
    before = scrape(client)
    calls = [("ok", None, 40.0), ("ok", None, 300.0), ("ok", None, 1500.0)]
    calls.append(("error", "timeout", 70_000.0))
    add_rows(
        *(
            Attempt(
                job_id=job,
                tier="gpu",
                backend="gpu-vllm",
                worker="w1",
                outcome=outcome,
                error_class=error_class,
                latency_ms=latency,
            )
            for outcome, error_class, latency in calls
        )
    )
    after = scrape(client)
    attempts = "tierq_attempts_total"
    assert delta(before, after, attempts, backend="gpu-vllm", outcome="ok", error_class="none") == 3
    assert (
        delta(before, after, attempts, backend="gpu-vllm", outcome="error", error_class="timeout")
        == 1
    )
    expected = {"0.05": 1, "0.1": 1, "0.25": 1, "0.5": 2, "1.0": 2, "2.5": 3}
    expected |= {"5.0": 3, "10.0": 3, "30.0": 3, "60.0": 3, "120.0": 4, "+Inf": 4}
    bucket = "tierq_backend_latency_seconds_bucket"
    for le, count in expected.items():
        assert delta(before, after, bucket, backend="gpu-vllm", le=le) == count, le
    histogram = "tierq_backend_latency_seconds"
    assert delta(before, after, f"{histogram}_count", backend="gpu-vllm") == 4
    assert delta(before, after, f"{histogram}_sum", backend="gpu-vllm") == pytest.approx(71.84)


def test_failovers_and_breaker(client: TestClient) -> None:
    from tierq.models import Backend, CircuitTransition, JobEvent

    name = f"metrics-{uuid.uuid4().hex[:8]}"  # a backend of our own: no other test moves it
    (job,) = add_jobs({"status": "queued", "tier": "hosted"})
    before = scrape(client)
    add_rows(
        JobEvent(job_id=job, kind="escalated", detail={"from": "gpu", "to": "cpu"}),
        JobEvent(job_id=job, kind="escalated", detail={"from": "cpu", "to": "hosted"}),
        JobEvent(job_id=job, kind="escalated", detail={"from": "cpu", "to": "hosted"}),
        JobEvent(job_id=job, kind="claimed", detail={}),
        Backend(name=name, tier="gpu", health="down", circuit="half_open"),
        CircuitTransition(backend=name, from_state="closed", to_state="open", reason="t"),
        CircuitTransition(backend=name, from_state="open", to_state="half_open", reason="t"),
    )
    after = scrape(client)
    assert delta(before, after, "tierq_failovers_total", **{"from": "gpu", "to": "cpu"}) == 1
    assert delta(before, after, "tierq_failovers_total", **{"from": "cpu", "to": "hosted"}) == 2
    transitions = "tierq_breaker_transitions_total"
    assert value(after, transitions, backend=name, to_state="open") == 1
    assert value(after, transitions, backend=name, to_state="half_open") == 1
    state = {s: value(after, "tierq_breaker_state", backend=name, state=s) for s in STATES}
    assert state == {"closed": 0, "open": 0, "half_open": 1}
    assert ("tierq_backend_up", frozenset({("backend", name)})) in after
    assert value(after, "tierq_backend_up", backend=name) == 0


def add_deliveries(*specs: dict[str, Any]) -> list[str]:
    """Webhook outbox rows (status, attempts, age_seconds) for one fresh job."""
    from tierq.db import db_now, session_scope
    from tierq.models import Job, WebhookDelivery

    (job_id,) = add_jobs({"status": "succeeded", "tier": "gpu", "quality": "full"})
    ids = []
    with session_scope() as session:
        owner = session.get_one(Job, job_id).owner_id
        for n, spec in enumerate(specs):
            fields = dict(spec)
            age = fields.pop("age_seconds", 0)
            ids.append(f"msg_{job_id.hex}_{n}")
            session.add(
                WebhookDelivery(
                    id=ids[-1],
                    job_id=job_id,
                    owner_id=owner,
                    event_type="job.succeeded",
                    url="https://receiver.example/hook",
                    payload="{}",
                    expires_at=db_now(3600),
                    next_attempt_at=db_now(),
                    created_at=db_now(-age),
                    **fields,
                )
            )
    return ids


def test_webhook_deliveries_by_status_attempts_and_oldest_undelivered(
    client: TestClient,
) -> None:
    from sqlalchemy import update

    from tierq.db import session_scope
    from tierq.models import WebhookDelivery

    before = scrape(client)
    pending, *_ = add_deliveries(
        {"status": "pending", "attempts": 2, "age_seconds": 600},
        {"status": "sending", "attempts": 1},
        {"status": "delivered", "attempts": 3},
        {"status": "failed", "attempts": 7},
    )
    middle = scrape(client)
    for status in ("pending", "sending", "delivered", "failed"):
        assert delta(before, middle, "tierq_webhook_deliveries", status=status) == 1, status
    assert delta(before, middle, "tierq_webhook_delivery_attempts_total") == 13
    assert value(middle, "tierq_oldest_undelivered_webhook_age_seconds") >= 600

    with session_scope() as session:  # the receiver answers the pending one at last
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == pending)
            .values(status="delivered", attempts=3)
        )
    after = scrape(client)
    assert delta(middle, after, "tierq_webhook_deliveries", status="pending") == -1
    assert delta(middle, after, "tierq_webhook_deliveries", status="delivered") == 1
    assert delta(middle, after, "tierq_webhook_delivery_attempts_total") == 1


def test_queue_depth_is_llen_of_the_broker_lists(
    client: TestClient, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    marker = f"metrics-test-{uuid.uuid4().hex}"
    before = scrape(client)
    redis.rpush("gpu", marker, marker, marker)
    redis.rpush("cpu\x06\x163", marker)  # kombu's list for priority 3 of queue "cpu"
    redis.rpush("webhooks", marker, marker)
    try:
        after = scrape(client)
    finally:
        redis.lrem("gpu", 0, marker)
        redis.lrem("cpu\x06\x163", 0, marker)
        redis.lrem("webhooks", 0, marker)
    assert delta(before, after, "tierq_queue_depth", queue="gpu", source="broker") == 3
    assert delta(before, after, "tierq_queue_depth", queue="cpu", source="broker") == 1
    assert delta(before, after, "tierq_queue_depth", queue="webhooks", source="broker") == 2
    assert ("tierq_queue_depth", frozenset({("queue", "emergency"), ("source", "broker")})) in after
    assert value(after, "tierq_broker_up") == 1


def test_a_dead_broker_costs_one_metric_not_the_scrape(env: dict[str, str]) -> None:
    from tierq.config import load_config
    from tierq.metrics import make_registry

    registry = make_registry(load_config(), broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    metrics = parse(generate_latest(registry).decode())
    assert time.monotonic() - started < 3
    assert value(metrics, "tierq_broker_up") == 0
    assert value(metrics, "tierq_scrape_errors_total", source="broker") == 1
    assert not any(name == "tierq_queue_depth" for name, _ in metrics)
    assert value(metrics, "tierq_database_up") == 1
    assert ("tierq_parked_jobs", frozenset()) in metrics


def test_a_dead_database_costs_its_metrics_not_the_scrape(env: dict[str, str]) -> None:
    from tierq.config import load_config
    from tierq.db import make_engine
    from tierq.metrics import make_registry

    engine = make_engine(f"postgresql+psycopg://tierq@127.0.0.1:{free_port()}/tierq")
    metrics = parse(generate_latest(make_registry(load_config(), engine=engine)).decode())
    engine.dispose()
    assert value(metrics, "tierq_database_up") == 0
    assert value(metrics, "tierq_scrape_errors_total", source="database") == 1
    assert ("tierq_parked_jobs", frozenset()) not in metrics
    assert value(metrics, "tierq_broker_up") == 1


def test_without_a_redis_broker_queue_depth_comes_from_the_database(env: dict[str, str]) -> None:
    from tierq.config import load_config
    from tierq.metrics import make_registry

    registry = make_registry(load_config(), broker_url="filesystem://")
    before = parse(generate_latest(registry).decode())
    add_jobs({"status": "queued", "tier": "cpu"}, {"status": "running", "tier": "cpu"})
    add_deliveries({"status": "pending"}, {"status": "sending"}, {"status": "delivered"})
    after = parse(generate_latest(registry).decode())
    assert delta(before, after, "tierq_queue_depth", queue="cpu", source="database") == 1
    assert delta(before, after, "tierq_queue_depth", queue="webhooks", source="database") == 1
    assert ("tierq_queue_depth", frozenset({("queue", "emergency"), ("source", "database")})) in (
        after
    )
    assert ("tierq_broker_up", frozenset()) not in after


# --- end to end: real workers move the counters ----------------------------------------


def sum_of(metrics: Scrape, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in metrics.items() if n == name and wanted <= series)


@pytest.mark.slow
def test_counters_move_as_real_workers_run_jobs_fail_over_and_call_back(
    tmp_path: Any,
    receiver: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    import httpx

    from tests.deployment import deployment
    from tests.services import wait_until
    from tests.test_webhooks import FAST

    with deployment(tmp_path) as d:
        d.stack.env.update(FAST)  # the receiver is on loopback; quick retries
        d.stack.api()
        d.stack.relay()
        for name in ("gpu", "cpu", "webhooks"):
            d.stack.worker(name)

        def scrape_api() -> Scrape:
            response = httpx.get(f"{d.stack.api_url}/metrics", timeout=10)
            assert response.status_code == 200
            return parse(response.text)

        before = scrape_api()
        with d.client() as client:
            d.submit(client, "one")
            d.submit(client, "two")
            d.wait_finished()
            d.fault("gpu-sim", mode="error_500", count=2)  # both gpu attempts fail: to cpu
            d.submit(client, "three", webhook_url=receiver.url)
            assert d.wait_finished().statuses == {"succeeded": 3}
            tiers = [client.get(f"/v1/jobs/{j}").json()["served_by"]["tier"] for j in d.jobs]
        assert tiers == ["gpu", "gpu", "cpu"]
        wait_until(
            lambda: value(scrape_api(), "tierq_webhook_deliveries", status="delivered") == 1,
            30,
            0.3,
            what="the webhook to be delivered",
        )
        after = scrape_api()

    finished = "tierq_jobs_finished_total"
    assert delta(before, after, finished, status="succeeded", tier="gpu", quality="full") == 2
    assert delta(before, after, finished, status="succeeded", tier="cpu", quality="reduced") == 1
    assert delta(before, after, "tierq_failovers_total", **{"from": "gpu", "to": "cpu"}) == 1
    attempts = "tierq_attempts_total"
    assert delta(before, after, attempts, backend="gpu-sim", outcome="ok", error_class="none") == 2
    assert (
        sum_of(after, attempts, backend="gpu-sim", outcome="error")
        - sum_of(before, attempts, backend="gpu-sim", outcome="error")
        == 2
    )
    latency = "tierq_backend_latency_seconds_count"
    assert delta(before, after, latency, backend="gpu-sim") == 4
    assert delta(before, after, latency, backend="cpu-sim") == 1
    assert value(after, "tierq_quality_sla_ratio") == 1.0  # all from the first two tiers
    assert delta(before, after, "tierq_webhook_deliveries", status="delivered") == 1
    assert delta(before, after, "tierq_webhook_delivery_attempts_total") == 1
    assert len(receiver.acknowledged()) == 1
