"""Failover under load: steady traffic at concurrency 16, the primary fails, later returns.

Run:  .venv/bin/python bench/failover.py [--failure kill|hang|both] [--parked 10000]

Real processes on this machine: Postgres (a fresh database), a throwaway Redis, the API,
one worker per tier, beat (relay + health probes), and the simulated backends as their own
processes so the primary can be SIGKILLed (connection refused) or made to hang.
Prints jobs lost, client-visible failures, time from the failure to the first answer from
the fallback, time until traffic is back on the primary after it returns, and the replay
drain rate of parked jobs against the configured cap.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import make_key, spawn, wait_http
from tests import ledger
from tests.deployment import backend, tier
from tests.services import RedisServer, SharedDatabase, free_port
from tierq.db import make_engine
from tierq.migrate import upgrade

PY = sys.executable
READ_TIMEOUT = 2.0
REPLAY_RATE = 500.0
FINAL = ("succeeded", "failed", "cancelled", "dead")
# A client re-checks this often whether the load has stopped while it waits for its job.
POLL_SECONDS = 5
# After the load stops, how long submitted jobs get to end before the unfinished count as lost.
SETTLE_SECONDS = 60


@dataclass
class Observed:
    answers: list[tuple[float, str]] = field(default_factory=list)  # (time, tier)
    failures: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)  # every accepted job, at submit time


def config(gpu: str, cpu: str) -> dict:
    breaker = {
        "window_seconds": 10,
        "min_calls": 3,
        "failure_rate": 0.5,
        "recovery_timeout": 2,
        "half_open_successes": 2,
        "slow_start_seconds": 3,
    }
    health = {"interval": 1, "canary": False}
    return {
        "tiers": [
            tier(
                "gpu",
                backend("gpu-sim", "openai", gpu, read_timeout=READ_TIMEOUT, health=health),
                breaker=breaker,
                retry={"attempts": 2, "base_delay": 0.05, "max_delay": 0.2},
            ),
            tier("cpu", backend("cpu-sim", "ollama", cpu, health=health), breaker=breaker),
        ],
        "emergency": {"retry_after": 5, "replay_rate": REPLAY_RATE},
    }


async def client_loop(api: httpx.AsyncClient, seen: Observed, stop: asyncio.Event) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "steady load"}]}
    while not stop.is_set():
        submitted = await api.post("/v1/jobs", json=body)
        if submitted.status_code != 202:
            seen.failures.append(f"submit {submitted.status_code}")
            continue
        job = submitted.json()
        # Recorded before waiting: a job that never ends is still counted (as lost).
        seen.job_ids.append(job["id"])
        job = await wait_for_end(api, job, stop)
        if job["status"] == "succeeded":
            seen.answers.append((time.monotonic(), job["served_by"]["tier"]))
        elif job["status"] in FINAL:
            seen.failures.append(f"{job['status']}: {job['error']}")


async def wait_for_end(api: httpx.AsyncClient, job: dict, stop: asyncio.Event) -> dict:
    """The job once it ended, or as it was when the load stopped: a client whose job hangs
    gives up then, and the database says afterwards whether the job was lost."""
    while job["status"] not in FINAL and not stop.is_set():
        job = (await api.get(f"/v1/jobs/{job['id']}", params={"wait": POLL_SECONDS})).json()
    return job


def settle(url: str, job_ids: list[str], timeout: float = SETTLE_SECONDS) -> ledger.Ledger:
    """Give the jobs still open when the load stopped a bounded time to end, then read the
    database: every submitted job not in a final state by then counts as lost."""
    deadline = time.monotonic() + timeout
    while True:
        result = ledger.read(url, job_ids)
        if result.lost == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def first_answer(seen: Observed, tier_name: str, after: float) -> float | None:
    times = [t for t, tier_ in seen.answers if tier_ == tier_name and t > after]
    return min(times) - after if times else None


def run_outage(env: dict, logs: Path, key: str, failure: str, url: str) -> None:
    gpu_port, cpu_port = free_port(), free_port()

    def simulator(name: str, port: int) -> object:
        return spawn(
            [PY, "-m", "cli", "simulate", "--backend", f"{name}={port}"], env, logs / f"{name}.log"
        )

    sims = {"gpu": simulator("gpu-sim", gpu_port), "cpu": simulator("cpu-sim", cpu_port)}
    gpu_url, cpu_url = f"http://127.0.0.1:{gpu_port}", f"http://127.0.0.1:{cpu_port}"
    for u in (gpu_url, cpu_url):
        wait_http(f"{u}/_sim/state")
    tiers_file = logs / f"tiers-{failure}.yaml"
    tiers_file.write_text(yaml.safe_dump(config(gpu_url, cpu_url)))
    env = {**env, "TIERQ_CONFIG": str(tiers_file)}
    port = free_port()
    processes = [
        spawn([PY, "-m", "cli", "api", "--port", str(port)], env, logs / "api.log"),
        spawn([PY, "-m", "cli", "beat"], env, logs / "beat.log"),
        spawn(
            [
                PY,
                "-m",
                "cli",
                "worker",
                "--tier",
                "gpu",
                "--calls",
                "4",
                "--loglevel",
                "WARNING",
            ],
            env,
            logs / "gpu.log",
        ),
        spawn(
            [
                PY,
                "-m",
                "cli",
                "worker",
                "--tier",
                "cpu",
                "--calls",
                "4",
                "--loglevel",
                "WARNING",
            ],
            env,
            logs / "cpu.log",
        ),
    ]
    seen = Observed()
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live")
        time.sleep(4)  # workers up
        failed_at, restored_at = asyncio.run(
            drive(port, key, seen, failure, sims, gpu_url, gpu_port, env, logs)
        )
        result = settle(url, seen.job_ids)  # while the deployment still runs
    finally:
        for process in [*processes, *sims.values()]:
            os.killpg(process.pid, signal.SIGKILL)
    # From the database, so a job that failed after its client stopped waiting counts too.
    refused = [f for f in seen.failures if f.startswith("submit")]
    failures = len(refused) + sum(n for st, n in result.statuses.items() if st in FINAL[1:])
    fallback = first_answer(seen, "cpu", failed_at)
    back = first_answer(seen, "gpu", restored_at)
    goal = "1 s" if failure == "kill" else f"{READ_TIMEOUT + 1:g} s (read timeout + 1 s)"
    print(
        f"primary {'killed (SIGKILL)' if failure == 'kill' else 'hanging'} under load, "
        f"concurrency 16: {len(seen.job_ids)} jobs"
    )
    print(
        f"  jobs lost: {result.lost} (goal 0; not ended {SETTLE_SECONDS} s after the load "
        f"stopped: {_open_statuses(result)}); answered twice: {result.answered_twice}"
    )
    print(
        f"  client-visible failures: {failures} (goal 0; refused at submit: {len(refused)}) "
        f"{seen.failures[:3]}"
    )
    print(f"  failure → first fallback answer: {_s(fallback)} (goal under {goal})")
    print(
        f"  primary back → first answer from it again: {_s(back)} "
        "(breaker recovery 2 s + health interval 1 s + trials)"
    )


async def drive(
    port: int,
    key: str,
    seen: Observed,
    failure: str,
    sims: dict,
    gpu_url: str,
    gpu_port: int,
    env: dict,
    logs: Path,
) -> tuple[float, float]:
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=60,
        limits=limits,
        headers={"Authorization": f"Bearer {key}"},
    ) as api:
        users = [asyncio.create_task(client_loop(api, seen, stop)) for _ in range(16)]
        await asyncio.sleep(8)
        failed_at = time.monotonic()
        if failure == "kill":
            os.killpg(sims["gpu"].pid, signal.SIGKILL)
        else:
            httpx.put(f"{gpu_url}/_sim/faults", json={"mode": "hang"})
        await asyncio.sleep(10)
        if failure == "kill":
            sims["gpu"] = spawn(
                [PY, "-m", "cli", "simulate", "--backend", f"gpu-sim={gpu_port}"],
                env,
                logs / "gpu-sim-2.log",
            )
            await asyncio.to_thread(wait_http, f"{gpu_url}/_sim/state")
        else:
            httpx.put(f"{gpu_url}/_sim/faults", json={"mode": "ok"})
        restored_at = time.monotonic()
        await asyncio.sleep(12)
        stop.set()
        await asyncio.gather(*users)
    return failed_at, restored_at


def run_drain(database_url: str, env: dict, logs: Path, count: int) -> None:
    """Park ``count`` jobs, then let beat replay them to a healthy tier; measure the rate."""
    from sqlalchemy import func, insert, select
    from sqlalchemy.orm import Session

    from tierq.models import ApiKey, Conversation, Job

    engine = make_engine(database_url)
    with Session(engine) as session, session.begin():
        owner = session.scalars(select(ApiKey.id)).first()
        conversation = uuid.uuid4()
        session.execute(
            insert(Conversation).values(id=conversation, owner_id=owner, turn_count=count)
        )
        session.execute(
            insert(Job),
            [
                {
                    "id": uuid.uuid4(),
                    "owner_id": owner,
                    "conversation_id": conversation,
                    "answer_seq": i,
                    "status": "parked",
                    "tier": "gpu",
                    "request": {"model": "m"},
                    "request_hash": "x",
                }
                for i in range(count)
            ],
        )
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    tiers_file = logs / "tiers-drain.yaml"
    tiers_file.write_text(yaml.safe_dump(config(sim_url, sim_url)))
    env = {**env, "TIERQ_CONFIG": str(tiers_file)}
    sim = spawn(
        [PY, "-m", "cli", "simulate", "--backend", f"sim={sim_port}"], env, logs / "drain-sim.log"
    )
    wait_http(f"{sim_url}/_sim/state")
    started = time.monotonic()
    beat = spawn([PY, "-m", "cli", "beat"], env, logs / "drain-beat.log")
    try:
        remaining = count
        first_release = None
        while remaining and time.monotonic() - started < 600:
            with engine.connect() as conn:
                remaining = conn.scalar(select(func.count()).where(Job.status == "parked"))
            if first_release is None and remaining < count:
                first_release = time.monotonic()
            time.sleep(0.2)
        finished = time.monotonic()
    finally:
        for process in (beat, sim):
            os.killpg(process.pid, signal.SIGKILL)
        engine.dispose()
    span = finished - (first_release or started)
    print(
        f"replay drain of {count} parked jobs: {count / span:.0f} jobs/s released "
        f"against a configured cap of {REPLAY_RATE:g}/s "
        f"(ratio {count / span / REPLAY_RATE:.2f})"
    )


def _open_statuses(result: ledger.Ledger) -> dict[str, int]:
    return {status: n for status, n in result.statuses.items() if status not in FINAL}


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--failure",
        choices=["kill", "hang", "both", "drain"],
        default="both",
        help="drain: only the replay drain of --parked jobs",
    )
    parser.add_argument("--parked", type=int, default=10_000)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="tierq-failover-"))
    redis = RedisServer()
    try:
        for failure in ["kill", "hang"] if args.failure == "both" else [args.failure]:
            database = SharedDatabase()
            upgrade(database.url)
            redis.client().flushall()
            env = {
                "TIERQ_DATABASE_URL": database.url,
                "TIERQ_BROKER_URL": redis.url,
                "TIERQ_HOME": str(logs),
                "TIERQ_LEASE_SECONDS": "10",
                "TIERQ_RELAY_INTERVAL": "0.2",
            }
            try:
                if failure != "drain":
                    run_outage(env, logs, make_key(database.url), failure, database.url)
                else:
                    make_key(database.url)  # the drain's parked jobs need an owner
                if args.parked and failure in ("kill", "drain"):
                    run_drain(database.url, env, logs, args.parked)
            finally:
                database.drop()
    finally:
        redis.stop()
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
