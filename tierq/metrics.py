"""Prometheus metrics read from the database (and the broker) at scrape time.

Workers are prefork processes on other machines, so counters kept in the API's memory would
miss everything they do. The database is the truth: every number here is a query run when
Prometheus scrapes. The queries behind each metric family are in ``tierq.metric_queries``;
this module runs them in one snapshot, adds the queue depths (from the broker, or from the
database when the broker cannot be counted), and counts the scrapes that failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from tierq import broker
from tierq.config import EMERGENCY_QUEUE, TierqConfig
from tierq.db import db_now, get_engine
from tierq.metric_queries import DATABASE_SECTIONS
from tierq.models import Job, JobStatus, WebhookDelivery
from tierq.settings import get_settings
from tierq.webhooks import QUEUE as WEBHOOKS_QUEUE
from tierq.webhooks import DeliveryStatus

log = logging.getLogger(__name__)

# A scrape must not hang on a dead broker or pile slow queries onto the database.
STATEMENT_TIMEOUT_MS = 5000
KEY_LIMITS = ("rps", "jobs", "waiters")  # api.key_limits: what a 429 can be for


# --- requests refused by a per-key limit (this process's count) ------------------------
# Kept in memory, not in the database: a refusal must cost nothing, and writing a row per
# refused request would hand a flooding key the database. Each API process counts its own,
# as it does its scrape errors.

_refusals: Counter[str] = Counter(dict.fromkeys(KEY_LIMITS, 0))
_refusals_lock = threading.Lock()


def count_refusal(limit: str) -> None:
    with _refusals_lock:
        _refusals[limit] += 1


def _refusals_family() -> CounterMetricFamily:
    family = CounterMetricFamily(
        "tierq_key_limit_refusals",
        "Requests this API process refused (429) for a per-key limit: rps, jobs, waiters.",
        labels=["limit"],
    )
    with _refusals_lock:
        for limit, count in sorted(_refusals.items()):
            family.add_metric([limit], count)
    return family


# --- queues -----------------------------------------------------------------------------


def queue_names(config: TierqConfig) -> list[str]:
    return [*config.tier_names, EMERGENCY_QUEUE, WEBHOOKS_QUEUE]


def database_queue_depths(conn: Connection, queues: list[str]) -> dict[str, int]:
    """For brokers we cannot count (filesystem, AMQP): jobs queued on each tier, and
    webhook deliveries that are due."""
    depths = dict.fromkeys(queues, 0)
    rows = conn.execute(
        select(Job.tier, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.tier)
    )
    for tier, count in rows:
        if tier in depths:
            depths[tier] = count
    if WEBHOOKS_QUEUE in depths:
        depths[WEBHOOKS_QUEUE] = conn.scalar(
            select(func.count()).where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= db_now(),
            )
        )
    return depths


def _queue_family(depths: dict[str, int], source: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "tierq_queue_depth",
        "Messages waiting in each broker queue (source=database: queued jobs per tier, "
        "due deliveries for webhooks).",
        labels=["queue", "source"],
    )
    for queue, depth in depths.items():
        family.add_metric([queue, source], depth)
    return family


# --- the collector ----------------------------------------------------------------------


class TierqCollector(Collector):
    """Runs the queries at every scrape. Engine and broker URL default to tierq's settings."""

    def __init__(
        self,
        config: TierqConfig,
        engine: Engine | None = None,
        broker_url: str | None = None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._broker_url = broker_url
        self._errors: Counter[str] = Counter({"database": 0, "broker": 0})
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        return self._engine or get_engine()

    @property
    def broker_url(self) -> str:
        return self._broker_url or get_settings().effective_broker_url

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        database, database_up = self._database_metrics()
        yield from database
        yield from self._broker_metrics()
        yield GaugeMetricFamily(
            "tierq_database_up", "1 if the metrics queries succeeded.", database_up
        )
        errors = CounterMetricFamily(
            "tierq_scrape_errors",
            "Scrapes (of this API process) that could not read a source.",
            labels=["source"],
        )
        with self._lock:
            for source, count in sorted(self._errors.items()):
                errors.add_metric([source], count)
        yield errors
        yield _refusals_family()
        yield GaugeMetricFamily(
            "tierq_scrape_duration_seconds",
            "Time spent reading the database and broker for this scrape.",
            time.perf_counter() - started,
        )

    def _failed(self, source: str, exc: Exception) -> None:
        log.warning("metrics: cannot read the %s: %s", source, exc)
        with self._lock:
            self._errors[source] += 1

    def _database_metrics(self) -> tuple[list[Metric], int]:
        """All database metrics from one read-only transaction, or none if it fails."""
        try:
            with self.engine.connect() as conn:
                conn = self._prepare(conn)
                with conn.begin():
                    self._limit_statement_time(conn)
                    metrics = [
                        m for section in DATABASE_SECTIONS for m in section(conn, self.config)
                    ]
                    if not broker.is_redis(self.broker_url):
                        depths = database_queue_depths(conn, queue_names(self.config))
                        metrics.append(_queue_family(depths, "database"))
        except SQLAlchemyError as exc:
            self._failed("database", exc)
            return [], 0
        return metrics, 1

    @staticmethod
    def _prepare(conn: Connection) -> Connection:
        if conn.dialect.name != "postgresql":
            return conn
        # One snapshot for every query, so the numbers of one scrape agree with each other.
        return conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)

    @staticmethod
    def _limit_statement_time(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))

    def _broker_metrics(self) -> Iterator[Metric]:
        url = self.broker_url
        if not broker.is_redis(url):
            return  # counted from the database above; there is no broker connection to judge
        try:
            depths = broker.redis_queue_depths(url, queue_names(self.config))
        except (redis.RedisError, OSError) as exc:
            self._failed("broker", exc)
            yield GaugeMetricFamily("tierq_broker_up", "1 if the broker answered.", 0)
            return
        yield GaugeMetricFamily("tierq_broker_up", "1 if the broker answered.", 1)
        yield _queue_family(depths, "broker")


def make_registry(
    config: TierqConfig, engine: Engine | None = None, broker_url: str | None = None
) -> CollectorRegistry:
    """A registry of tierq's metrics only (no process metrics of whichever API served it)."""
    registry = CollectorRegistry()
    registry.register(TierqCollector(config, engine, broker_url))
    return registry
