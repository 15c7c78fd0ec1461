"""The Celery application as a *transport*: its configuration and the one way to publish.

The broker only carries doorbells (``run_job(job_id)``); every message can be rebuilt from
the database, so a lost message costs latency, never a job. Each setting below closes one
of the sharp edges listed in ``shared/notes/celery-durability.md``.
"""

from __future__ import annotations

import logging
import os
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.redis import Channel as RedisChannel
from redis.backoff import NoBackoff
from redis.retry import Retry

from tierq import folder_transport
from tierq.config import EMERGENCY_QUEUE
from tierq.settings import Settings, get_settings

RUN_JOB = "tierq.run_job"
log = logging.getLogger(__name__)

# The API's fast path: one quick retry, then give up; the relay publishes from the database.
FAST_PATH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# The relay can afford to wait a little longer; it tries again next sweep anyway.
RELAY_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.effective_broker_url
    if url.startswith((folder_transport.SCHEME, "filesystem")):
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,  # default 1 s would add up to a second per job
        }
    return {
        # kombu reads visibility_timeout only here, not from a top-level setting
        # (celery#9339). It must outlast the longest job, or a running job is delivered
        # again to another worker; our lease recovers dead workers far sooner anyway.
        "visibility_timeout": settings.visibility_timeout,
        # Without these, apply_async against a dead Redis can hang (celery#4296).
        "socket_timeout": 5,
        "socket_connect_timeout": 3,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=transport_options(settings),
        # Ack after the task returns: a worker that dies mid-task leaves its message.
        task_acks_late=True,
        # A pool child killed by a signal requeues its message instead of acking it. This
        # loops forever on a poison job (celery#9082): the claim counts deliveries.
        task_reject_on_worker_lost=True,
        # One reserved message per process: a dead worker strands as few as possible.
        worker_prefetch_multiplier=1,
        # Workers ride out a broker outage of any length (the default gives up after 100).
        broker_connection_max_retries=None,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Fast path: fail quickly so the API answers; the relay publishes what failed.
        task_publish_retry=True,
        task_publish_retry_policy=FAST_PATH_RETRY,
        # On SIGTERM, stop taking work and requeue unacked messages instead of letting them
        # wait out the visibility timeout (Celery >= 5.5).
        worker_soft_shutdown_timeout=settings.shutdown_grace,
        worker_enable_soft_shutdown_on_idle=True,
        # Publish by queue name through the default exchange: nothing depends on
        # _kombu.binding.* keys, which a Redis flush erases.
        task_create_missing_queues=True,
        task_default_queue=EMERGENCY_QUEUE,
        # Results live in the database; the broker stores none.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # Flower needs events to show tasks and workers.
        worker_send_task_events=True,
        task_send_sent_event=False,
        # Never `expires=` on jobs: an expired message is silently revoked, never run.
        # A long-running job is ours to end (lease, deadline), not the broker's.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_channel_error_retry=True,
    )


@lru_cache
def get_celery() -> Celery:
    app = Celery("tierq", set_as_current=False)
    configure(app, get_settings())
    return app


@lru_cache
def _direct(name: str) -> Queue:
    return Queue(name, Exchange(""), routing_key=name)


def publish(
    job_id: uuid.UUID | str, queue: str, *, retry_policy: dict[str, Any] | None = None
) -> bool:
    """Ring the doorbell for one job on ``queue``. False (logged) if the broker is unreachable."""
    return send(RUN_JOB, job_id, queue, retry_policy=retry_policy)


def send(
    task: str,
    row_id: uuid.UUID | str,
    queue: str,
    *,
    retry_policy: dict[str, Any] | None = None,
    kind: str = "job",
) -> bool:
    """One message of ``task`` for one row (a ``kind``: job, webhook) on ``queue``."""
    try:
        # The default exchange ("") routes by queue name alone; a named exchange would need
        # kombu's binding keys, which a Redis flush erases, and would then drop messages.
        get_celery().send_task(
            task,
            args=[str(row_id)],
            queue=_direct(queue),
            retry=True,
            retry_policy=retry_policy or FAST_PATH_RETRY,
        )
    except Exception as exc:  # any transport error: the relay will publish it
        log.warning("publish of %s %s to %s failed: %s", kind, row_id, queue, type(exc).__name__)
        return False
    return True


# -- how many messages wait in each queue ------------------------------------------------

# Short: a scrape or a relay sweep must not wait on a Redis that is away.
REDIS_CONNECT_TIMEOUT = 0.5
REDIS_SOCKET_TIMEOUT = 1.0


def is_redis(url: str) -> bool:
    # redis+socket:// and sentinel:// brokers are not counted here.
    return url.startswith(("redis://", "rediss://"))


def queue_depths(settings: Settings, queues: list[str]) -> dict[str, int] | None:
    """Messages waiting in each queue; None when they cannot be counted: Redis unreachable
    (publishing would fail too), or RabbitMQ, whose durable queues redeliver an unacked
    message themselves and so lose none that a republish would have to replace."""
    url = settings.effective_broker_url
    if is_redis(url):
        try:
            return redis_queue_depths(url, queues)
        except redis.RedisError as exc:
            log.warning("cannot count the broker's queues (%s)", type(exc).__name__)
            return None
    if url.startswith((folder_transport.SCHEME, "filesystem")):
        return folder_queue_depths(settings.broker_folder / "queue", queues)
    return None


def redis_queue_depths(url: str, queues: list[str]) -> dict[str, int]:
    """LLEN of each queue, including kombu's per-priority lists; raises if Redis is away."""
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),  # redis-py retries by default; a count must not wait
    )
    try:
        keys = {queue: _priority_keys(queue) for queue in queues}
        pipe = client.pipeline(transaction=False)
        for queue_keys in keys.values():
            for key in queue_keys:
                pipe.llen(key)
        lengths = iter(pipe.execute())
        return {queue: sum(next(lengths) for _ in queue_keys) for queue, queue_keys in keys.items()}
    finally:
        client.close()


def _priority_keys(queue: str) -> list[str]:
    # kombu keeps a message with priority p in list "<queue>\x06\x16<p>" (p > 0), so a queue's
    # depth is the sum of those lists, not only the one named after it.
    steps = RedisChannel.priority_steps
    return [queue, *(f"{queue}{RedisChannel.sep}{step}" for step in steps if step)]


def folder_queue_depths(folder: Path, queues: list[str]) -> dict[str, int]:
    """The folder broker keeps one file per message, named ``<stamp>_<id>.<queue>.msg``."""
    depths = dict.fromkeys(queues, 0)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return depths
    for name in names:
        queue = name.partition(".")[2].removesuffix(".msg")
        if queue in depths and name.endswith(".msg"):
            depths[queue] += 1
    return depths
