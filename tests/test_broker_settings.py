"""The Celery settings that durability rests on, read back as Celery and kombu see them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection

from tests.services import RedisServer
from tierq.broker import configure
from tierq.config import load_config
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
    assert conf.worker_send_task_events and conf.task_send_sent_event


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
