"""The Celery settings that durability rests on, read back as Celery and kombu see them."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select

from tests.deployment import FAST_TIMINGS, Deployment, backend, deployment, tier
from tests.services import RedisServer, wait_until
from tierq.broker import configure
from tierq.config import load_config
from tierq.db import make_engine
from tierq.models import JobEvent
from tierq.settings import Settings


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[Celery]:
    app = Celery("check", set_as_current=False)
    configure(app, Settings(broker_url=redis_server.url, visibility_timeout=7200))
    yield app


def test_effective_durability_settings(app: Celery) -> None:
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_connection_max_retries is None
    assert conf.worker_soft_shutdown_timeout > 0
    assert conf.task_publish_retry_policy["max_retries"] <= 1
    assert conf.task_ignore_result is True
    # Flower shows tasks from the workers' events; the "sent" event is left off the API's
    # hot path (a Flower task then starts at "received").
    assert conf.worker_send_task_events


def test_kombu_reads_the_visibility_timeout_and_socket_timeouts(app: Celery) -> None:
    with Connection(
        app.conf.broker_url, transport_options=app.conf.broker_transport_options
    ) as conn:
        channel = conn.default_channel
        assert channel.visibility_timeout == 7200
        assert channel.socket_timeout == 5
        assert channel.socket_connect_timeout == 3


def test_visibility_timeout_outlasts_the_longest_job() -> None:
    settings = Settings()
    config = load_config()
    longest = max(t.retry.attempts * max(b.read_timeout for b in t.backends) for t in config.tiers)
    assert settings.visibility_timeout > longest


def test_the_zero_install_broker_polls_fast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = Celery("check", set_as_current=False)
    configure(app, Settings(home=tmp_path, broker_url=""))
    assert app.conf.broker_url == "atomicfs://"
    assert app.conf.broker_transport_options["polling_interval"] <= 0.1


def test_folder_broker_never_shows_a_half_written_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kombu's own filesystem transport creates the file before writing it; a consumer
    that lists the folder in between reads an empty message and its worker dies."""
    import os
    import threading

    app = Celery("check", set_as_current=False)
    configure(app, Settings(home=tmp_path, broker_url=""))
    folder = app.conf.broker_transport_options["data_folder_in"]
    seen_partial: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(folder):
                if name.endswith(".msg"):
                    path = os.path.join(folder, name)
                    try:
                        if os.path.getsize(path) == 0:
                            seen_partial.append(name)
                    except FileNotFoundError:
                        pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    with Connection(
        app.conf.broker_url, transport_options=app.conf.broker_transport_options
    ) as conn:
        queue = conn.SimpleQueue("gpu")
        payload = {"job": "x" * 100_000}
        for _ in range(200):
            queue.put(payload)
        got = [queue.get(timeout=2) for _ in range(200)]
        for message in got:
            message.ack()
        queue.close()
    stop.set()
    watcher.join()
    assert seen_partial == []
    assert all(m.payload == payload for m in got)


def test_a_running_worker_has_the_durability_settings(tmp_path: Path) -> None:
    """Read back from a real worker process (remote control), not from a freshly built app:
    a setting lost between configure() and the running worker would show here."""
    with deployment(tmp_path, env={"TIERQ_VISIBILITY_TIMEOUT": "5400"}) as d:
        d.stack.worker("gpu")
        with d.celery() as app:
            inspect = app.control.inspect(timeout=10, limit=1)
            replies = inspect.conf(with_defaults=True) or {}
            stats = inspect.stats() or {}
    # A unique name per worker (two workers of a tier may share a host), on the threads
    # pool sized to the tier's total call slots.
    assert len(replies) == 1 and next(iter(replies)).startswith("gpu-"), replies
    pool = next(iter(stats.values()))["pool"]
    assert pool["implementation"].endswith("thread:TaskPool"), pool
    assert (
        pool["max-concurrency"]
        == load_config(d.config_file).tier("gpu").backends[0].max_concurrency
    )
    conf = next(iter(replies.values()))
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_connection_max_retries"] is None
    assert conf["worker_soft_shutdown_timeout"] > 0
    # From the worker's environment, in the one place kombu reads it (celery#9339).
    assert conf["broker_transport_options"]["visibility_timeout"] == 5400
    assert conf["broker_transport_options"]["socket_timeout"] > 0


def _claims(d: Deployment, job_id: str) -> list[str]:
    """The workers that claimed the job, in order."""
    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            details = conn.scalars(
                select(JobEvent.detail)
                .where(JobEvent.job_id == uuid.UUID(job_id), JobEvent.kind == "claimed")
                .order_by(JobEvent.id)
            ).all()
    finally:
        engine.dispose()
    return [detail["worker"] for detail in details]


@pytest.mark.slow
def test_sigterm_mid_job_hands_the_job_to_another_worker(tmp_path: Path) -> None:
    """An orchestrator stopping a worker (SIGTERM) mid-call: the warm shutdown gives the
    call its time (worker_soft_shutdown_timeout minus a margin), then the worker stops the
    call and hands its job back to the queue itself; another worker answers it once, long
    before the broker's visibility timeout or the job's lease (a minute here) would have
    brought it back, and the stop is not counted as a crash (no lost lease)."""
    app = Celery("check", set_as_current=False)
    # The deployment's workers run with the tests' grace (TIERQ_SHUTDOWN_GRACE), read back
    # through the same configure() they use.
    configure(app, Settings(shutdown_grace=float(FAST_TIMINGS["TIERQ_SHUTDOWN_GRACE"])))
    soft = float(app.conf.worker_soft_shutdown_timeout)
    call = soft + 5  # outlasts the soft shutdown: the job cannot finish where it started
    lease = 60.0  # far longer than the hand-over may take

    def long_calls(urls: dict[str, str]) -> dict[str, Any]:
        gpu = backend("gpu-sim", "openai", urls["gpu-sim"], read_timeout=call + 10)
        return {"tiers": [tier("gpu", gpu)]}

    with deployment(
        tmp_path,
        config=long_calls,
        simulators=("gpu-sim",),
        env={"TIERQ_LEASE_SECONDS": str(lease)},
    ) as d:
        d.stack.api()
        d.stack.relay()
        stopping = d.stack.worker("gpu", calls=1)
        d.fault("gpu-sim", latency_ms=int(call * 1000))
        with d.client() as client:
            job_id = d.submit(client).json()["id"]
        wait_until(lambda: d.calls("gpu-sim") == 1, 10, what="the call to start")
        d.fault("gpu-sim", latency_ms=0)  # the call in flight keeps its latency
        d.stack.worker("gpu", calls=1)
        stopped_at = time.monotonic()
        os.kill(stopping.popen.pid, signal.SIGTERM)
        stopping.popen.wait(soft + 20)
        exited_at = time.monotonic()
        result = d.wait_finished(30)
        handed_over = time.monotonic() - exited_at
        took = time.monotonic() - stopped_at
        claims = _claims(d, job_id)
        lost_leases = d.job(job_id)["lost_leases"]
        requeued = d.events("requeued")
    assert (result.finished, result.lost, result.answered_twice, result.mismatched) == (1, 0, 0, 0)
    assert result.statuses == {"succeeded": 1}
    # Claimed by the stopping worker, then answered by the other one.
    assert len(claims) == 2 and claims[0] != claims[1], claims
    # The call was stopped and the job handed back by the stopping worker itself.
    assert "stopped (shutdown)" in stopping.output(), stopping.output()
    assert took < soft + 30 < Settings().visibility_timeout
    assert handed_over < lease / 4, f"waited {handed_over:.1f}s after the worker exited"
    assert sum(requeued.values()) == 1 and lost_leases == 0, (requeued, lost_leases)
