"""Shared fixtures. Every run gets its own Postgres database and its own Redis server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import RedisServer, SharedDatabase


def _reset_caches() -> None:
    from tierq import broker, db, settings

    settings.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db._session_factory.cache_clear()
    broker.get_celery.cache_clear()


@pytest.fixture(scope="session")
def database() -> Iterator[SharedDatabase]:
    from tierq.migrate import upgrade

    db = SharedDatabase()
    upgrade(db.url)
    yield db
    from tierq.db import get_engine

    get_engine().dispose()
    db.drop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tmp_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def env(
    database: SharedDatabase, redis_server: RedisServer, tmp_home: Path
) -> Iterator[dict[str, str]]:
    """Point this process (and child processes given this env) at the test services."""
    values = {
        "TIERQ_HOME": str(tmp_home),
        "TIERQ_DATABASE_URL": database.url,
        "TIERQ_BROKER_URL": redis_server.url,
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    _reset_caches()
    yield {**os.environ, **values}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reset_caches()


@pytest.fixture
def api_key(env: dict[str, str]) -> str:
    from tierq.db import session_scope
    from tierq.keys import create_key

    with session_scope() as session:
        return create_key(session, "test").key
