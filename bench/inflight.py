"""Calls in flight per worker: does ONE worker process keep its backend's batch full?

Run:  .venv/bin/python bench/inflight.py [--cap 64] [--clients 256] [--total 2048]
          [--max-seconds 60] [--worker-args="--calls 64"]

A simulated backend that takes 1 s per call (fault ``latency_ms: 1000``) is the only
backend of a one-tier configuration (``gpu``) with ``max_concurrency`` = ``--cap``.
Postgres (a fresh database on 127.0.0.1:5432 per phase) and a throwaway Redis (flushed per
phase); the API, the relay and ONE worker (``tierq worker --tier gpu``, plus
``--worker-args`` if given, nothing otherwise: the default configuration must reach the
cap) are real processes, started afresh for each phase. ``--clients`` concurrent clients
make ``--total`` calls in each phase:

- baseline: a stateless async proxy (bench/proxy_app.py: FastAPI + httpx, no durability)
  in front of the same backend, holding at most ``--cap`` calls at once, as tierq must;
- tierq ``POST /v1/chat/completions`` (non-streamed; a 504 is retried with the same
  ``Idempotency-Key``, as the API asks);
- tierq ``POST /v1/jobs`` then ``GET /v1/jobs/{id}?wait=30`` until the job has ended.

Per phase: the simulator's own max in flight (``GET /_sim/stats``, reset between phases),
the mean in flight while the clients had at least cap calls open (sampled 4 times a
second, after the first 2 s), max in flight / cap, throughput, p50/p99 latency of the
calls that completed, the calls the backend received; the memory of the worker (the
process and its children: RSS summed, and PSS, which counts pages a prefork pool shares
once) or of the proxy, sampled from /proc: idle (after the warm-up), peak during the run,
and per 100 calls in flight; the Postgres connections the worker has open at peak
(pooled ones included: one per call would take 64 of the shared server's 100).
Throughput is printed next to the baseline's of the same run as a ratio. Requests the API
asks to send again (a 503 with Retry-After, a chat's 504) are sent again and counted. A
phase still running after ``--max-seconds`` is cut: its unfinished calls are counted and
left out of the latencies.

Exits 1 if a tierq phase's max in flight is below 0.95 x cap, or above the cap (the cap is
``max_concurrency``, counted across workers in the database), so it can serve as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    cpu_seconds,
    make_key,
    memory_bytes,
    process_tree,
    spawn,
    tcp_connections,
    wait_http,
)
from tests.deployment import backend, tier
from tests.services import RedisServer, SharedDatabase, free_port
from tierq.migrate import upgrade

PY = sys.executable
LATENCY_MS = 1000
TARGET = 0.95  # of the cap, with one worker process
BODY = {"model": "m", "messages": [{"role": "user", "content": "in flight"}], "max_tokens": 16}
FINAL = ("succeeded", "failed", "cancelled", "dead")
SAMPLE_SECONDS = 0.25
SETTLING_SECONDS = 2.0  # in-flight samples before this are left out of the mean
MiB = 1024 * 1024
POSTGRES_PORT = 5432
CHAT_ENDPOINT = "POST /v1/chat/completions"
CLIENT_POOL = 16  # connections per httpx client of the load generator

Call = Callable[[httpx.AsyncClient], Awaitable[None]]


class CallFailed(Exception):
    """A call that ended without an answer; the message says how."""


@dataclass
class Phase:
    name: str
    issued: int = 0
    completed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)  # requests sent again, and why
    cut: bool = False
    client_cpu: float = 0.0  # CPU seconds of this benchmark's own process (the clients)
    max_in_flight: int = 0
    sim_calls: int = 0
    sim_endpoints: dict[str, int] = field(default_factory=dict)
    open_samples: list[int] = field(default_factory=list)
    idle_memory: tuple[int, int] = (0, 0)
    peak_memory: tuple[int, int] = (0, 0)
    peak_db_connections: int = 0  # the measured process tree's, to Postgres
    server_cpu: float = 0.0  # CPU seconds of the measured process (proxy, or tierq's worker)

    @property
    def unfinished(self) -> int:
        return self.issued - self.completed - sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def mean_in_flight(self) -> float:
        return statistics.fmean(self.open_samples) if self.open_samples else float("nan")

    @property
    def other_calls(self) -> int:
        """Requests the backend received besides chat completions (health probes): the
        simulator counts them in flight too."""
        return self.sim_calls - self.sim_endpoints.get(CHAT_ENDPOINT, 0)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---- the load -------------------------------------------------------------------------


async def drive(
    phase: Phase,
    call: Call,
    args: argparse.Namespace,
    sim_url: str,
    headers: dict[str, str] | None,
    measured_pid: int | None,
) -> None:
    """``args.clients`` clients make ``args.total`` calls; the simulator's in-flight count
    and the measured process tree's memory are sampled meanwhile."""

    async def user(client: httpx.AsyncClient) -> None:
        while phase.issued < args.total:
            phase.issued += 1
            started = time.perf_counter()
            try:
                await call(client)
            except (CallFailed, httpx.HTTPError) as exc:
                phase.errors[_reason(exc)] += 1
                await asyncio.sleep(0.1)  # no tight loop against a failing server
                continue
            phase.latencies.append(time.perf_counter() - started)
            phase.completed += 1

    async def sample(admin: httpx.AsyncClient, started: float) -> None:
        while True:
            if measured_pid is not None:
                rss, pss, db = await asyncio.to_thread(tree_footprint, measured_pid)
                phase.peak_memory = (
                    max(phase.peak_memory[0], rss),
                    max(phase.peak_memory[1], pss),
                )
                phase.peak_db_connections = max(phase.peak_db_connections, db)
            try:
                in_flight = (await admin.get(f"{sim_url}/_sim/stats")).json()["in_flight"]
            except httpx.HTTPError:
                in_flight = None
            # While the clients have at least cap calls open, the backend could hold cap.
            settled = time.perf_counter() - started > SETTLING_SECONDS
            if in_flight is not None and settled and phase.unfinished >= args.cap:
                phase.open_samples.append(in_flight)
            await asyncio.sleep(SAMPLE_SECONDS)

    # Clients share connection pools of CLIENT_POOL connections: one httpx pool of 256
    # connections costs the client ~18 ms of CPU per call (the pool is scanned per request),
    # enough to make the bench, not the servers, the bottleneck on this machine.
    limits = httpx.Limits(max_connections=CLIENT_POOL, max_keepalive_connections=CLIENT_POOL)
    timeout = httpx.Timeout(120, pool=None)
    pools = -(-args.clients // CLIENT_POOL)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers)
            )
            for _ in range(pools)
        ]
        admin = await stack.enter_async_context(httpx.AsyncClient(timeout=5))
        started, cpu_started = time.perf_counter(), time.process_time()
        sampler = asyncio.create_task(sample(admin, started))
        users = [asyncio.create_task(user(clients[i % pools])) for i in range(args.clients)]
        _, pending = await asyncio.wait(users, timeout=args.max_seconds)
        phase.seconds = time.perf_counter() - started
        phase.client_cpu = time.process_time() - cpu_started
        phase.cut = bool(pending)
        for task in [*pending, sampler]:
            task.cancel()
        await asyncio.gather(*pending, sampler, return_exceptions=True)
        stats = (await admin.get(f"{sim_url}/_sim/stats")).json()
    phase.max_in_flight = stats["max_in_flight"]
    phase.sim_calls = stats["total"]
    phase.sim_endpoints = stats["endpoints"]


def tree_footprint(pid: int) -> tuple[int, int, int]:
    """RSS and PSS (bytes) of the process and its children, and their Postgres connections."""
    tree = process_tree(pid)
    return (*memory_bytes(tree), tcp_connections(tree, POSTGRES_PORT))


def _reason(exc: Exception) -> str:
    return str(exc)[:80] if isinstance(exc, CallFailed) else type(exc).__name__


def proxy_call(url: str, retried: Counter[str]) -> Call:
    async def call(client: httpx.AsyncClient) -> None:
        r = await client.post(f"{url}/v1/chat/completions", json=BODY)
        if r.status_code != 200:
            raise CallFailed(f"proxy {r.status_code}")

    return call


async def retryable(r: httpx.Response, what: str, retried: Counter[str]) -> bool:
    """Whether to send the request again, as the API asks: a 503 (nothing accepted, the
    database was unavailable; or a parked job) after its Retry-After. Counted: on this
    machine's shared Postgres, a burst of long-polls can meet "too many clients already"."""
    if r.status_code != 503 or "retry-after" not in r.headers:
        return False
    retried[f"{what} 503 {_title(r)}"] += 1
    await asyncio.sleep(float(r.headers["retry-after"]))
    return True


def _title(r: httpx.Response) -> str:
    try:
        return str(r.json().get("title", ""))[:40]
    except ValueError:
        return ""


def chat_call(url: str, retried: Counter[str]) -> Call:
    async def call(client: httpx.AsyncClient) -> None:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        while True:
            r = await client.post(f"{url}/v1/chat/completions", json=BODY, headers=key)
            if r.status_code == 200:
                if not r.json().get("choices"):
                    raise CallFailed("chat 200 without choices")
                return
            if r.status_code == 504 and r.headers.get("x-should-retry") == "true":
                retried["chat 504 (wait ran out; the same key waits again)"] += 1
                continue
            if not await retryable(r, "chat", retried):
                raise CallFailed(f"chat {r.status_code} {_title(r)}")

    return call


def jobs_call(url: str, retried: Counter[str]) -> Call:
    async def call(client: httpx.AsyncClient) -> None:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        while True:
            r = await client.post(f"{url}/v1/jobs", json=BODY, headers=key)
            if r.status_code == 202:
                break
            if not await retryable(r, "submit", retried):
                raise CallFailed(f"submit {r.status_code} {_title(r)}")
        job = r.json()
        while job["status"] not in FINAL:
            r = await client.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30})
            if r.status_code == 200:
                job = r.json()
            elif not await retryable(r, "long-poll", retried):
                raise CallFailed(f"long-poll {r.status_code} {_title(r)}")
        if job["status"] != "succeeded":
            raise CallFailed(f"job {job['status']}")

    return call


# ---- the phases -----------------------------------------------------------------------


def reset_stats(sim_url: str) -> None:
    httpx.post(f"{sim_url}/_sim/stats/reset").raise_for_status()


def run_proxy(args: argparse.Namespace, sim_url: str, logs: Path) -> Phase:
    port = free_port()
    proxy = spawn(
        [
            PY,
            "-m",
            "uvicorn",
            "bench.proxy_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-keep-alive",
            "75",
        ],
        {"PROXY_UPSTREAM": sim_url, "PROXY_CAP": str(args.cap)},
        logs / "proxy.log",
    )
    phase = Phase("baseline: async proxy")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health")
        httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=30).raise_for_status()
        reset_stats(sim_url)
        phase.idle_memory = memory_bytes(process_tree(proxy.pid))
        cpu = cpu_seconds(proxy.pid)
        asyncio.run(drive(phase, proxy_call(url, phase.retried), args, sim_url, None, proxy.pid))
        phase.server_cpu = cpu_seconds(proxy.pid) - cpu
    finally:
        kill(proxy)
    return phase


def run_tierq(
    kind: str,
    args: argparse.Namespace,
    env: dict[str, str],
    redis: RedisServer,
    sim_url: str,
    logs: Path,
) -> Phase:
    phase = Phase("tierq chat completions" if kind == "chat" else "tierq jobs + long-poll")
    database = SharedDatabase()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(database.url)
        key = make_key(database.url)
        redis.client().flushall()
        env = {**env, "TIERQ_DATABASE_URL": database.url}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        worker_cmd = [PY, "-m", "cli", "worker", "--tier", "gpu", *shlex.split(args.worker_args)]
        api = spawn([PY, "-m", "cli", "api", "--port", str(port)], env, logs / f"api-{kind}.log")
        relay = spawn([PY, "-m", "cli", "relay"], env, logs / f"relay-{kind}.log")
        worker = spawn(worker_cmd, env, logs / f"worker-{kind}.log")
        processes = [api, relay, worker]
        wait_http(f"{url}/health/live")
        warm_up(url, key, worker, logs / f"worker-{kind}.log")
        reset_stats(sim_url)
        phase.idle_memory = memory_bytes(process_tree(worker.pid))
        call = (chat_call if kind == "chat" else jobs_call)(url, phase.retried)
        headers = {"Authorization": f"Bearer {key}"}
        cpu = cpu_seconds(worker.pid)
        asyncio.run(drive(phase, call, args, sim_url, headers, worker.pid))
        phase.server_cpu = cpu_seconds(worker.pid) - cpu
    finally:
        for process in processes:
            kill(process)
        database.drop()
    return phase


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's group (spawn starts each in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def warm_up(url: str, key: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Four jobs answered: the worker is up and consuming (its connections warm)."""
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=40, headers={"Authorization": f"Bearer {key}"}) as api:
        ids = []
        for _ in range(4):
            r = api.post("/v1/jobs", json=BODY)
            r.raise_for_status()
            ids.append(r.json()["id"])
        for job_id in ids:
            while True:
                if worker.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"the worker exited ({worker.returncode}):\n{tail}")
                job = api.get(f"/v1/jobs/{job_id}", params={"wait": 2}).json()
                if job["status"] == "succeeded":
                    break
                if job["status"] in FINAL or time.monotonic() > deadline:
                    raise SystemExit(f"warm-up job {job_id} did not succeed: {job}")


# ---- the report -----------------------------------------------------------------------


def report(args: argparse.Namespace, phases: list[Phase]) -> bool:
    baseline = phases[0]
    worker = " ".join(["tierq worker --tier gpu", args.worker_args]).strip()
    print(
        f"calls in flight: backend {args.latency_ms} ms per call, "
        f"cap (max_concurrency) {args.cap}, {args.clients} clients, "
        f"{args.total} calls per phase, one worker ({worker})"
    )

    def row(label: str, cell: Callable[[Phase], str]) -> None:
        print(f"  {label:38s}" + "".join(f"{cell(phase):>24s}" for phase in phases))

    def per_100(phase: Phase, megabytes: float) -> str:
        return f"{megabytes / phase.max_in_flight * 100:.0f}" if phase.max_in_flight else "-"

    def mib(value: int) -> float:
        return value / MiB

    row("", lambda p: p.name)
    row("max in flight (the simulator's)", lambda p: f"{p.max_in_flight}")
    row(f"  / cap {args.cap}", lambda p: f"{p.max_in_flight / args.cap:.2f}")
    row(f"mean in flight (>= {args.cap} calls open)", lambda p: _num(p.mean_in_flight, 1))
    row("throughput, calls/s", lambda p: f"{p.throughput:.1f}")
    row(
        "  ratio to the baseline",
        lambda p: (
            "-"
            if p is baseline or not baseline.throughput
            else f"{p.throughput / baseline.throughput:.2f}"
        ),
    )
    row("latency p50, s", lambda p: _num(p.percentile(50), 2))
    row("latency p99, s", lambda p: _num(p.percentile(99), 2))
    row(
        "answered / errors / unfinished",
        lambda p: f"{p.completed} / {sum(p.errors.values())} / {p.unfinished}",
    )
    row(
        "calls the backend received (+ others)",
        lambda p: (
            f"{p.sim_calls - p.other_calls}" + (f" + {p.other_calls}" if p.other_calls else "")
        ),
    )
    row("load generator CPU, % of one core", lambda p: f"{p.client_cpu / p.seconds * 100:.0f}")
    # A worker is one process: at C ms of CPU per call it sustains at most 1000 / C calls a
    # second, so calls of d seconds fill at most d * 1000 / C slots.
    row(
        "proxy / worker CPU per call, ms",
        lambda p: f"{p.server_cpu / max(p.completed, 1) * 1000:.1f}",
    )
    row("proxy / worker CPU, % of one core", lambda p: f"{p.server_cpu / p.seconds * 100:.0f}")
    row(
        "RSS idle -> peak, MiB",
        lambda p: f"{mib(p.idle_memory[0]):.0f} -> {mib(p.peak_memory[0]):.0f}",
    )
    row(
        "PSS idle -> peak, MiB",
        lambda p: f"{mib(p.idle_memory[1]):.0f} -> {mib(p.peak_memory[1]):.0f}",
    )
    row("Postgres connections open, peak", lambda p: f"{p.peak_db_connections}")
    row("peak RSS per 100 in flight, MiB", lambda p: per_100(p, mib(p.peak_memory[0])))
    row(
        "RSS growth per 100 in flight, MiB",
        lambda p: per_100(p, mib(p.peak_memory[0] - p.idle_memory[0])),
    )
    print(
        "  memory and connections: the baseline's proxy process, or the worker process and its"
        " children (RSS summed; PSS counts shared pages once); idle after the warm-up, peak"
        " sampled in the run"
    )
    for phase in phases:
        if phase.cut:
            print(
                f"  {phase.name}: cut after {args.max_seconds:g} s with {phase.unfinished} "
                "calls unfinished (left out of the latencies)"
            )
        if phase.errors:
            print(f"  {phase.name}: errors {dict(phase.errors.most_common(5))}")
        if phase.retried:
            print(f"  {phase.name}: requests sent again {dict(phase.retried.most_common(5))}")
    ok = True
    need = TARGET * args.cap
    for phase in phases[1:]:
        if phase.max_in_flight < need:
            ok = False
            verdict = f"FAIL (below {need:g})"
        elif phase.max_in_flight > args.cap and not phase.other_calls:
            ok = False
            verdict = f"FAIL (above the cap {args.cap}: max_concurrency not kept)"
        elif phase.max_in_flight > args.cap:
            verdict = (
                f"ok, but above the cap {args.cap}: max_concurrency not kept, or the "
                f"{phase.other_calls} other requests (health probes) were in flight too"
            )
        else:
            verdict = "ok"
        print(
            f"check: {phase.name}: max in flight {phase.max_in_flight} / cap {args.cap} = "
            f"{phase.max_in_flight / args.cap:.2f} (target >= {TARGET}): {verdict}"
        )
    return ok


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=64, help="the backend's max_concurrency")
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=LATENCY_MS,
        help="how long the backend takes per call (longer calls need less CPU per slot)",
    )
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--total", type=int, default=2048, help="calls per phase")
    parser.add_argument(
        "--max-seconds", type=float, default=60, help="a phase is cut after this long"
    )
    parser.add_argument(
        "--worker-args",
        default="",
        help="extra arguments of `tierq worker --tier gpu`, none by default; spell it "
        '--worker-args="--calls 64" (argparse takes a lone "--calls" for an option)',
    )
    parser.add_argument(
        "--phases",
        default="proxy,chat,jobs",
        help="comma-separated subset of proxy,chat,jobs (the proxy is the baseline)",
    )
    args = parser.parse_args()
    wanted = args.phases.split(",")
    if set(wanted) - {"proxy", "chat", "jobs"}:
        parser.error(f"--phases: unknown {sorted(set(wanted) - {'proxy', 'chat', 'jobs'})}")
    if "proxy" not in wanted:
        parser.error("the baseline (proxy) runs in every run: each figure is printed next to it")
    logs = Path(tempfile.mkdtemp(prefix="tierq-inflight-"))
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    config = {
        "tiers": [
            tier(
                "gpu",
                backend(
                    "sim",
                    "openai",
                    sim_url,
                    read_timeout=30,
                    max_concurrency=args.cap,
                    health={"interval": 3600, "canary": False},
                ),
            )
        ]
    }
    (logs / "tiers.yaml").write_text(yaml.safe_dump(config))
    redis = RedisServer()
    env = {
        "TIERQ_BROKER_URL": redis.url,
        "TIERQ_HOME": str(logs),
        "TIERQ_CONFIG": str(logs / "tiers.yaml"),
    }
    phases = []
    sim = None
    try:
        sim = spawn(
            [PY, "-m", "cli", "simulate", "--backend", f"sim={sim_port}"],
            {"TIERQ_SIM_FAULTS": f'{{"latency_ms": {args.latency_ms}}}'},
            logs / "sim.log",
        )
        wait_http(f"{sim_url}/_sim/state")
        state = httpx.get(f"{sim_url}/_sim/state").json()
        assert state["faults"]["latency_ms"] == args.latency_ms, state
        phases.append(run_proxy(args, sim_url, logs))
        for kind in ("chat", "jobs"):
            if kind in wanted:
                phases.append(run_tierq(kind, args, env, redis, sim_url, logs))
    finally:
        if sim is not None:
            kill(sim)
        redis.stop()
    ok = report(args, phases)
    print(f"logs: {logs}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
