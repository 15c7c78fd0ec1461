"""The database's metric families: each group of metrics is one query (or two), run by
``tierq.metrics.TierqCollector`` at every scrape. Counts of rows that are never deleted or
changed (terminal jobs, attempts, breaker transitions, escalation events) only grow, so
they are real counters.

Webhook deliveries are rows whose status changes (pending → sending → delivered or
failed, and back to pending on a redelivery), so they are a gauge by status, not a counter;
their attempts only grow, so those are a counter.

Each group of metrics is one function ``(connection, config) -> metric families`` in
``DATABASE_SECTIONS``; adding one is one more function in that tuple.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection, case, func, select

from tierq.config import TierqConfig
from tierq.db import db_now
from tierq.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    Backend,
    Circuit,
    CircuitTransition,
    Health,
    Job,
    JobEvent,
    JobStatus,
    WebhookDelivery,
)
from tierq.webhooks import DeliveryStatus

# Seconds. LLM calls range from tens of milliseconds (a cache-warm small model) to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Answers of these qualities from the first SLA_TIERS tiers count as "good" for the SLA.
SLA_QUALITIES = ("full", "reduced")
SLA_TIERS = 2
CIRCUIT_STATES = tuple(Circuit)
DELIVERY_STATUSES = (
    DeliveryStatus.PENDING,
    DeliveryStatus.SENDING,
    DeliveryStatus.DELIVERED,
    DeliveryStatus.FAILED,
)
UNDELIVERED = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
UP_HEALTH = (Health.HEALTHY, Health.DEGRADED)
NONE_LABEL = "none"  # label value for a NULL column (quality, error_class)

Section = Callable[[Connection, TierqConfig], Iterable[Metric]]


def _label(value: str | None) -> str:
    return value if value is not None else NONE_LABEL


# --- jobs -------------------------------------------------------------------------------


def job_metrics(conn: Connection, config: TierqConfig) -> Iterator[Metric]:
    """Jobs by status and tier, finished jobs by quality, and the quality SLA: one GROUP BY."""
    rows = conn.execute(
        select(Job.status, Job.tier, Job.quality, func.count()).group_by(
            Job.status, Job.tier, Job.quality
        )
    ).all()
    current: Counter[tuple[str, str]] = Counter()
    # Zero series for the active states of every tier, so "queued == 0" is a value, not absence.
    for tier in config.tier_names:
        for status in ACTIVE_STATUSES:
            current[(str(status), tier)] = 0
    finished = CounterMetricFamily(
        "tierq_jobs_finished",
        "Jobs that reached a terminal status.",
        labels=["status", "tier", "quality"],
    )
    sla_tiers = set(config.tier_names[:SLA_TIERS])
    succeeded = good = 0
    for status, tier, quality, count in rows:
        current[(status, tier)] += count
        if status in TERMINAL_STATUSES:
            finished.add_metric([status, tier, _label(quality)], count)
        if status == JobStatus.SUCCEEDED:
            succeeded += count
            good += count if tier in sla_tiers and quality in SLA_QUALITIES else 0
    jobs = GaugeMetricFamily(
        "tierq_jobs", "Jobs in the database now, by status and tier.", labels=["status", "tier"]
    )
    for (status, tier), count in sorted(current.items()):
        jobs.add_metric([status, tier], count)
    yield jobs
    yield finished
    if succeeded:  # no ratio without answers; an absent series beats a made-up 0 or 1
        yield GaugeMetricFamily(
            "tierq_quality_sla_ratio",
            f"Share of succeeded jobs answered at quality {'/'.join(SLA_QUALITIES)} by the "
            f"first {SLA_TIERS} tiers, since the start of the record.",
            value=good / succeeded,
        )


def parked_metrics(conn: Connection, _config: TierqConfig) -> Iterator[Metric]:
    """How many jobs are parked, and how long the oldest has waited (database clock)."""
    count, oldest, now = conn.execute(
        select(func.count(), func.min(Job.created_at), db_now()).where(
            Job.status == JobStatus.PARKED
        )
    ).one()
    yield GaugeMetricFamily("tierq_parked_jobs", "Jobs parked until a backend recovers.", count)
    yield GaugeMetricFamily(
        "tierq_oldest_parked_job_age_seconds",
        "Age of the oldest parked job (0 when none is parked).",
        _age_seconds(oldest, now),
    )


def _age_seconds(oldest: datetime | None, now: datetime) -> float:
    if oldest is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


# --- backends ---------------------------------------------------------------------------


def attempt_metrics(conn: Connection, _config: TierqConfig) -> Iterator[Metric]:
    """Backend calls by outcome, and their latency histogram: one scan of attempts."""
    buckets = [
        func.sum(case((Attempt.latency_ms <= le * 1000, 1), else_=0)) for le in LATENCY_BUCKETS
    ]
    rows = conn.execute(
        select(
            Attempt.backend,
            Attempt.outcome,
            Attempt.error_class,
            func.count(),
            func.sum(Attempt.latency_ms),
            *buckets,
        ).group_by(Attempt.backend, Attempt.outcome, Attempt.error_class)
    ).all()
    attempts = CounterMetricFamily(
        "tierq_attempts",
        "Backend calls, by outcome and error class.",
        labels=["backend", "outcome", "error_class"],
    )
    # Per backend: [count, sum of ms, cumulative count per bucket...]
    latency: dict[str, list[float]] = defaultdict(lambda: [0.0] * (2 + len(LATENCY_BUCKETS)))
    for backend, outcome, error_class, count, total_ms, *in_buckets in rows:
        attempts.add_metric([backend, outcome, _label(error_class)], count)
        acc = latency[backend]
        for i, value in enumerate((count, total_ms or 0.0, *in_buckets)):
            acc[i] += value or 0
    histogram = HistogramMetricFamily(
        "tierq_backend_latency_seconds",
        "Latency of backend calls (successful or not).",
        labels=["backend"],
    )
    for backend, (count, total_ms, *cumulative) in sorted(latency.items()):
        histogram.add_metric(
            [backend],
            buckets=[
                *(
                    (floatToGoString(le), n)
                    for le, n in zip(LATENCY_BUCKETS, cumulative, strict=True)
                ),
                ("+Inf", count),
            ],
            sum_value=total_ms / 1000,
        )
    yield attempts
    yield histogram


def failover_metrics(conn: Connection, _config: TierqConfig) -> Iterator[Metric]:
    """Escalations from one tier to the next, from the job event log."""
    moves = (
        select(
            JobEvent.detail["from"].as_string().label("src"),
            JobEvent.detail["to"].as_string().label("dst"),
        )
        .where(JobEvent.kind == "escalated")
        .subquery()
    )
    # Grouping on a subquery's columns: Postgres refuses GROUP BY on a JSON expression whose
    # key is a different bound parameter than the one in the SELECT list.
    rows = conn.execute(
        select(moves.c.src, moves.c.dst, func.count()).group_by(moves.c.src, moves.c.dst)
    ).all()
    family = CounterMetricFamily(
        "tierq_failovers", "Jobs escalated from one tier to another.", labels=["from", "to"]
    )
    for src, dst, count in rows:
        family.add_metric([_label(src), _label(dst)], count)
    yield family


def breaker_metrics(conn: Connection, _config: TierqConfig) -> Iterator[Metric]:
    """Breaker transitions (counter), and each backend's breaker state, health and switch."""
    transitions = CounterMetricFamily(
        "tierq_breaker_transitions",
        "Circuit breaker state changes, by the state entered.",
        labels=["backend", "to_state"],
    )
    for backend, to_state, count in conn.execute(
        select(CircuitTransition.backend, CircuitTransition.to_state, func.count()).group_by(
            CircuitTransition.backend, CircuitTransition.to_state
        )
    ):
        transitions.add_metric([backend, to_state], count)
    yield transitions

    state = GaugeMetricFamily(
        "tierq_breaker_state",
        "1 for the breaker's current state, 0 for the others.",
        labels=["backend", "state"],
    )
    up = GaugeMetricFamily(
        "tierq_backend_up",
        "1 if the last probe found the backend healthy or degraded.",
        labels=["backend"],
    )
    disabled = GaugeMetricFamily(
        "tierq_backend_disabled", "1 if an operator disabled the backend.", labels=["backend"]
    )
    rows = conn.execute(
        select(Backend.name, Backend.circuit, Backend.health, Backend.disabled).order_by(
            Backend.name
        )
    )
    for name, circuit, health, is_disabled in rows:
        for candidate in CIRCUIT_STATES:
            state.add_metric([name, candidate], float(circuit == candidate))
        up.add_metric([name], float(health in UP_HEALTH))
        disabled.add_metric([name], float(bool(is_disabled)))
    yield from (state, up, disabled)


# --- webhooks ---------------------------------------------------------------------------


def webhook_metrics(conn: Connection, _config: TierqConfig) -> Iterator[Metric]:
    """Deliveries by status now, every POST made, and how long the oldest undelivered one
    has waited (a receiver that is down shows here long before its deliveries fail)."""
    by_status = Counter(dict.fromkeys(DELIVERY_STATUSES, 0))
    attempts = 0
    for status, count, tried in conn.execute(
        select(
            WebhookDelivery.status,
            func.count(),
            func.coalesce(func.sum(WebhookDelivery.attempts), 0),
        ).group_by(WebhookDelivery.status)
    ):
        by_status[status] += count
        attempts += tried
    deliveries = GaugeMetricFamily(
        "tierq_webhook_deliveries",
        "Webhook events in the database now, by delivery status (pending: waiting for its "
        "next try; sending: being posted; delivered: the receiver answered 2xx; failed: "
        "given up).",
        labels=["status"],
    )
    for status, count in sorted(by_status.items()):
        deliveries.add_metric([status], count)
    yield deliveries
    yield CounterMetricFamily(
        "tierq_webhook_delivery_attempts",
        "POSTs made to webhook receivers, whatever their outcome.",
        value=attempts,
    )
    oldest, now = conn.execute(
        select(func.min(WebhookDelivery.created_at), db_now()).where(
            WebhookDelivery.status.in_(UNDELIVERED)
        )
    ).one()
    yield GaugeMetricFamily(
        "tierq_oldest_undelivered_webhook_age_seconds",
        "Age of the oldest pending or sending webhook event (0 when all are settled).",
        _age_seconds(oldest, now),
    )


DATABASE_SECTIONS: tuple[Section, ...] = (
    job_metrics,
    parked_metrics,
    attempt_metrics,
    failover_metrics,
    breaker_metrics,
    webhook_metrics,
)
