"""Shared pieces of the benchmarks: services, processes and latency statistics."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @classmethod
    def merged(cls, runs: list[Run]) -> Run:
        return cls(
            sum(r.requests for r in runs),
            sum(r.seconds for r in runs),
            [latency for r in runs for latency in r.latencies],
        )

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def load(
    call: Callable[[httpx.AsyncClient], Awaitable[None]], total: int, concurrency: int
) -> Run:
    latencies: list[float] = []
    remaining = iter(range(total))

    async def user(client: httpx.AsyncClient) -> None:
        for _ in remaining:
            started = time.perf_counter()
            await call(client)
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return Run(total, time.perf_counter() - started, latencies)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args,
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


def make_key(url: str) -> str:
    """An API key created straight in the benchmark's database."""
    from sqlalchemy.orm import Session

    from tierq.db import make_engine
    from tierq.keys import create_key

    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        key = create_key(session, "bench").key
    engine.dispose()
    return key
