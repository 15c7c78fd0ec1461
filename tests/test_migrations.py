"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.services import SharedDatabase
from tierq.db import make_engine
from tierq.migrate import upgrade
from tierq.models import Base


def _differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_models_and_migrations_agree(dialect: str, tmp_path: Path) -> None:
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'schema.db'}"
        upgrade(url)
        assert _differences(url) == []
        return
    database = SharedDatabase()
    try:
        upgrade(database.url)
        assert _differences(database.url) == []
    finally:
        database.drop()


def test_the_answer_constraint_is_in_the_database(database: SharedDatabase) -> None:
    import psycopg

    dsn = f"host=127.0.0.1 user=postgres dbname={database.name}"
    with psycopg.connect(dsn) as conn:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'turns'::regclass"
            )
        }
    assert {"uq_turns_job_answer", "uq_turns_conversation_seq"} <= names
