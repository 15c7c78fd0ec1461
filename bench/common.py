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
    """An API key created straight in the benchmark's database, with no per-key limits: the
    benchmarks measure tierq's throughput, not its refusals."""
    from sqlalchemy.orm import Session

    from tierq.db import make_engine
    from tierq.keys import create_key

    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        key = create_key(session, "bench", rps=0, max_jobs=0, max_waiters=0).key
    engine.dispose()
    return key


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (Linux /proc); gone ones are skipped."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended while we looked
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        if Path(f"/proc/{current}").exists():
            tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def memory_bytes(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over ``pids``, in bytes. RSS counts pages shared between forked
    processes once per process; PSS splits them among the sharers, so its sum is the real
    footprint of a prefork pool (0 when /proc/PID/smaps_rollup cannot be read)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue  # ended while we looked
    return rss, pss


def tcp_connections(pids: list[int], remote_port: int) -> int:
    """Established TCP connections that ``pids`` hold open to ``remote_port`` (e.g. 5432:
    how many database connections a process tree holds), from /proc: socket inodes of the
    processes' file descriptors matched against /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # ended while we looked
    if not inodes or not pids:
        return 0
    port = f":{remote_port:04X}"
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl, local, remote, state (01 = ESTABLISHED), ..., inode (the 10th)
            if fields[2].endswith(port) and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count
