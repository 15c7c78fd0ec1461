"""Engine, sessions and the database clock.

Leases, due times and deadlines are computed by the database (``db_now``), never by a
worker's clock: two machines whose clocks disagree still agree on who holds a lease.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import FunctionElement

from tierq.settings import get_settings


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, always an aware UTC datetime in Python, on every database.

    Postgres stores ``timestamptz``; SQLite has no time type and stores UTC text, which
    comes back naive (or as text, from an expression such as ``db_now()``). One type
    normalizes both ways, so no caller ever compares a naive time with an aware one.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        utc = aware.astimezone(UTC)
        return utc if dialect.name == "postgresql" else utc.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return as_utc(value)


def as_utc(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from what a driver hands back (naive UTC, text or aware)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class db_now(FunctionElement[Any]):
    """The database's current time plus ``seconds`` (a bound parameter, may be negative)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


@compiles(db_now, "postgresql")
def _pg_now(element: db_now, compiler: Any, **kw: Any) -> str:
    args = list(element.clauses)
    if not args:
        return "statement_timestamp()"
    return f"(statement_timestamp() + make_interval(secs => {compiler.process(args[0], **kw)}))"


@compiles(db_now, "sqlite")
def _sqlite_now(element: db_now, compiler: Any, **kw: Any) -> str:
    # Same text format SQLAlchemy stores DateTime in, so comparisons stay lexical-correct.
    args = list(element.clauses)
    offset = f", ({compiler.process(args[0], **kw)}) || ' seconds'" if args else ""
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now'{offset})"


class db_random(FunctionElement[Any]):
    """A uniform draw in [0, 1) per row, made by the database (a jitter in one statement)."""

    type = Float()
    inherit_cache = True
    name = "db_random"


@compiles(db_random, "postgresql")
def _pg_random(element: db_random, compiler: Any, **kw: Any) -> str:
    return "random()"


@compiles(db_random, "sqlite")
def _sqlite_random(element: db_random, compiler: Any, **kw: Any) -> str:
    return "((abs(random()) % 1000000) / 1000000.0)"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=10000")  # several processes share one file
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")  # accepted means durable, even on power loss
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    # A logged database error would otherwise carry the row's values: prompts, key hashes.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 10}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    settings = get_settings()
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
    }
    if url.startswith("postgresql"):
        # Fail fast when Postgres is down: a submit must answer 503, not hang.
        options["connect_args"] = {"connect_timeout": 3}
    options.update(kwargs)
    return create_engine(url, **options)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().effective_database_url)


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any exception."""
    session = _session_factory()()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


@contextmanager
def transaction() -> Iterator[Connection]:
    """One transaction on a bare connection, for hot paths that need no ORM unit of work."""
    with get_engine().begin() as conn:
        yield conn
