"""A whole tierq deployment for a test: its own database, broker, simulators and processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests import ledger
from tests.services import PostgresCluster, RedisServer, SharedDatabase, wait_until
from tests.simulator_fixture import running_simulator
from tests.stack import Stack
from tierq import broker
from tierq.db import make_engine
from tierq.keys import create_key
from tierq.migrate import upgrade
from tierq.models import Job, JobEvent
from tierq.settings import Settings

FAST_TIMINGS = {
    "TIERQ_LEASE_SECONDS": "3",
    "TIERQ_REPUBLISH_AFTER": "4",
    "TIERQ_RELAY_INTERVAL": "0.2",
    "TIERQ_MAX_DELIVERIES": "3",
    "TIERQ_SHUTDOWN_GRACE": "4",
}


@dataclass
class Deployment:
    stack: Stack
    database_url: str
    simulators: dict[str, str]
    redis: RedisServer | None = None
    postgres: PostgresCluster | None = None
    key: str = ""
    config_file: Path | None = None
    jobs: list[str] = field(default_factory=list)
    home: Path | None = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.stack.api_url, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )

    def submit(
        self, client: httpx.Client, content: str = "hello", **extra: object
    ) -> httpx.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": content}], **extra}
        response = client.post("/v1/jobs", json=body)
        if response.status_code == 202:
            self.jobs.append(response.json()["id"])
        return response

    def fault(self, simulator: str, **faults: object) -> None:
        httpx.put(f"{self.simulators[simulator]}/_sim/faults", json=faults).raise_for_status()

    def calls(self, simulator: str) -> int:
        return httpx.get(f"{self.simulators[simulator]}/_sim/stats").json()["total"]

    def ledger(self) -> ledger.Ledger:
        return ledger.read(self.database_url, self.jobs)

    def broker_settings(self) -> Settings:
        """The settings the deployment's processes run with, for its broker."""
        return Settings(
            home=self.stack.env["TIERQ_HOME"], broker_url=self.stack.env["TIERQ_BROKER_URL"]
        )

    def celery(self) -> Celery:
        """A Celery app on this deployment's broker (not the test process's own settings)."""
        app = Celery("test-publisher", set_as_current=False)
        broker.configure(app, self.broker_settings())
        return app

    def publish(self, job_id: str, queue: str) -> None:
        """Ring the job's doorbell once more, on the deployment's broker: a duplicate."""
        with self.celery() as app:
            app.send_task(
                broker.RUN_JOB,
                args=[job_id],
                queue=broker._direct(queue),
                retry=True,
                retry_policy=broker.FAST_PATH_RETRY,
            )

    def queued_messages(self, queue: str) -> int:
        """Messages waiting in the broker queue (not those a worker reserved)."""
        if self.redis is not None:
            return int(self.redis.client().llen(queue))
        folder = self.broker_settings().broker_folder / "queue"
        return len(list(folder.glob(f"*.{queue}.msg")))

    def flush_broker(self) -> None:
        """The broker loses everything it holds: a Redis FLUSHALL, or the folder broker's
        queue folder emptied (a wiped disk), the relay's marker with it."""
        if self.redis is not None:
            self.redis.client().flushall()
            return
        for entry in (self.broker_settings().broker_folder / "queue").iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)

    def job(self, job_id: str) -> dict[str, object]:
        """The job's row, as the database has it now."""
        engine = make_engine(self.database_url)
        try:
            with engine.connect() as conn:
                row = conn.execute(select(Job).where(Job.id == uuid.UUID(job_id))).one()
        finally:
            engine.dispose()
        return dict(row._mapping)

    def events(self, kind: str) -> dict[str, int]:
        """How many events of ``kind`` each of the test's jobs has (jobs with none left out)."""
        engine = make_engine(self.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(JobEvent.job_id, func.count().label("n"))
                    .where(
                        JobEvent.kind == kind,
                        JobEvent.job_id.in_([uuid.UUID(j) for j in self.jobs]),
                    )
                    .group_by(JobEvent.job_id)
                ).all()
        finally:
            engine.dispose()
        return {str(row.job_id): int(row.n) for row in rows}

    def wait_finished(self, timeout: float = 60) -> ledger.Ledger:
        wait_until(
            lambda: ledger.open_count(self.database_url, self.jobs) == 0,
            timeout,
            0.3,
            what=f"{len(self.jobs)} jobs to finish",
        )
        return self.ledger()


def _make_key(url: str) -> str:
    engine = make_engine(url)
    try:
        with Session(engine) as session, session.begin():
            return create_key(session, "test").key
    finally:
        engine.dispose()


def two_tiers(urls: dict[str, str]) -> dict[str, Any]:
    """The default test topology: gpu (OpenAI protocol) → cpu (Ollama protocol)."""
    return {
        "tiers": [
            tier("gpu", backend("gpu-sim", "openai", urls["gpu-sim"])),
            tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"])),
        ]
    }


def backend(name: str, protocol: str, url: str, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": protocol,
        "url": url,
        "model": f"{name}-model",
        "connect_timeout": 0.5,
        "read_timeout": 5,
        **options,
    }


def tier(name: str, *backends: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backends": list(backends),
        "retry": {"attempts": 2, "base_delay": 0.05, "max_delay": 0.2},
        **options,
    }


@contextmanager
def deployment(
    folder: Path,
    mode: str = "postgres-redis",
    config: Callable[[dict[str, str]], dict[str, Any]] = two_tiers,
    simulators: tuple[str, ...] = ("gpu-sim", "cpu-sim"),
    env: Mapping[str, str] | None = None,
) -> Iterator[Deployment]:
    """``mode``: postgres-redis, or sqlite-filesystem (the zero-install default), or
    throwaway-postgres (a Postgres of its own that the test may stop). ``env`` overrides
    settings of every process (e.g. one of FAST_TIMINGS)."""
    overrides = env or {}
    with ExitStack() as stack:
        process_env = {**os.environ, **FAST_TIMINGS, **overrides, "TIERQ_HOME": str(folder)}
        redis = postgres = None
        if mode == "sqlite-filesystem":
            url = f"sqlite:///{folder / 'tierq.db'}"
            process_env["TIERQ_BROKER_URL"] = ""
        else:
            redis = RedisServer()
            stack.callback(redis.stop)
            process_env["TIERQ_BROKER_URL"] = redis.url
            if mode == "throwaway-postgres":
                postgres = PostgresCluster()
                stack.callback(postgres.destroy)
                url = postgres.url
            else:
                database = SharedDatabase()
                stack.callback(database.drop)
                url = database.url
        process_env["TIERQ_DATABASE_URL"] = url
        upgrade(url)
        urls = {name: stack.enter_context(running_simulator(name)) for name in simulators}
        config_file = folder / "tiers.yaml"
        config_file.write_text(yaml.safe_dump(config(urls)))
        process_env["TIERQ_CONFIG"] = str(config_file)
        processes = Stack(process_env, folder)
        stack.callback(processes.stop)
        yield Deployment(
            processes,
            url,
            urls,
            redis,
            postgres,
            key=_make_key(url),
            config_file=config_file,
            home=folder,
        )
