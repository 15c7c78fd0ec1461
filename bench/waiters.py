"""Idle waiters: what 1,000 long-polls and 500 SSE streams cost one API process.

Run:  .venv/bin/python bench/waiters.py [--mode both|postgres|sqlite] [--code DIR]

One API process (``tierq api``), no worker, so every job stays queued and every waiter
waits: ``--long-polls`` ``GET /v1/jobs/{id}?wait=60`` and ``--streams`` SSE streams, half of
them a job's events (``GET /v1/jobs/{id}/events``), half streamed chats (``POST
/v1/chat/completions`` with ``stream: true``), spread over ``--keys`` keys so that no key
reaches a limit, opened in turn over ``--ramp`` seconds and measured ``--settle`` seconds
after the last one (opened faster, the arrivals alone saturate the API on two cores: see
docs/benchmarks.md). Measured on Postgres (a fresh database, a throwaway Redis as
broker: chats stream through Redis) and on the zero-install default (SQLite, the folder
broker), each against the same run's idle figures:

- ``/health/live`` p50 and ``POST /v1/jobs`` p50 (``--probes`` sequential requests of a key
  of their own), idle and with the waiters open;
- the API process's CPU over ``--idle-seconds`` with nothing else to do, idle and with the
  waiters open;
- how long each wait=60 long-poll lasted (it must not overrun);
- a key with the default waiters limit (and no rate limit, so that only that one answers):
  ``TIERQ_KEY_MAX_WAITERS`` long-polls are held, the next ``--extra`` are answered 429.

``--code DIR`` runs the API from another checkout (``git archive REV | tar -x -C DIR``):
the same load on the code before a change (the schema is migrated by this checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, cpu_seconds, p50, wait_http
from tests.services import RedisServer, SharedDatabase, free_port
from tierq.settings import Settings

PY = sys.executable
BODY = {"model": "m", "messages": [{"role": "user", "content": "wait for me"}]}
CHAT = {**BODY, "stream": True}
WAIT = 60  # the long-polls' wait, seconds: the longest the API allows
LIMIT = Settings().key_max_waiters  # the default waiters limit the last check meets


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_keys(url: str, count: int) -> list[str]:
    """``count`` keys with the default limits, after one with no rate limit (the limit
    check's: it holds its waiters in one burst, and only the waiters limit must answer)."""
    from sqlalchemy.orm import Session

    from tierq.db import make_engine
    from tierq.keys import create_key

    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        keys = [create_key(session, "bench-limit", rps=0).key]
        keys += [create_key(session, f"bench-{i}").key for i in range(count)]
    engine.dispose()
    return keys


async def gather_limited(calls: list[Awaitable[Any]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Awaitable[Any]) -> Any:
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


async def submit(client: httpx.AsyncClient, key: str) -> str:
    response = await client.post("/v1/jobs", json=BODY, headers=auth(key))
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def probes(client: httpx.AsyncClient, key: str, count: int) -> tuple[float, float]:
    """p50 ms of /health/live and of POST /v1/jobs, ``count`` sequential requests each."""
    live, posts = [], []
    for _ in range(count):
        started = time.perf_counter()
        assert (await client.get("/health/live")).status_code == 200
        live.append(time.perf_counter() - started)
        started = time.perf_counter()
        await submit(client, key)
        posts.append(time.perf_counter() - started)
    return p50(live), p50(posts)


async def cpu_percent(pid: int, seconds: float) -> float:
    """The process's CPU over ``seconds``, in % of one core."""
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds * 100


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    retry_after: str | None


async def raw(port: int, method: str, path: str, key: str, body: Any = None) -> Answer:
    """One request on a connection of its own, read to its end.

    Plain asyncio streams, not httpx: an httpx client holding a thousand connections spends
    seconds in its pool's bookkeeping per burst (200 long-polls with wait=3 lasted up to
    5.5 s through one httpx client, 3.3 s through sockets), which would be counted as the
    server's."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        content = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + content)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()).strip():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        while await reader.read(65536):  # a stream stays open until it ends or is cancelled
            pass
        return Answer(status, time.monotonic() - started, headers.get("retry-after"))
    finally:
        writer.close()


async def long_poll(port: int, key: str, job: str, wait: float = WAIT) -> Answer:
    return await raw(port, "GET", f"/v1/jobs/{job}?wait={wait:g}", key)


def spread(keys: list[str], count: int) -> list[str]:
    return [keys[i % len(keys)] for i in range(count)]


async def after(delay: float, call: Awaitable[Answer]) -> Answer:
    await asyncio.sleep(delay)
    return await call


async def open_waiters(
    client: httpx.AsyncClient, port: int, keys: list[str], args: argparse.Namespace
) -> tuple[list[asyncio.Task[Answer]], list[asyncio.Task[Answer]]]:
    """Queued jobs, then the long-polls and the streams on them, opened evenly over
    ``args.ramp`` seconds in turn: (long-polls, streams)."""
    long_polls, events = args.long_polls, args.streams // 2
    owners = spread(keys, long_polls + events)
    jobs = await gather_limited([submit(client, key) for key in owners], 16)
    calls: list[tuple[str, Awaitable[Answer]]] = [
        *(
            ("long-poll", long_poll(port, k, j))
            for k, j in zip(owners, jobs[:long_polls], strict=False)
        ),
        *(
            ("events", raw(port, "GET", f"/v1/jobs/{job}/events", key))
            for key, job in zip(owners[long_polls:], jobs[long_polls:], strict=True)
        ),
        *(
            ("chat", raw(port, "POST", "/v1/chat/completions", key, CHAT))
            for key in spread(keys, args.streams - events)
        ),
    ]
    random.Random(7).shuffle(calls)  # the kinds mixed over the ramp
    step = args.ramp / max(len(calls), 1)
    tasks = [
        asyncio.create_task(after(i * step, call), name=kind)
        for i, (kind, call) in enumerate(calls)
    ]
    polls = [t for t in tasks if t.get_name() == "long-poll"]
    return polls, [t for t in tasks if t.get_name() != "long-poll"]


async def limit_check(client: httpx.AsyncClient, port: int, key: str, extra: int) -> list[Answer]:
    """The answers to ``extra`` long-polls past a key's ``LIMIT`` held ones."""
    job = await submit(client, key)
    held = [asyncio.create_task(long_poll(port, key, job)) for _ in range(LIMIT)]
    await asyncio.sleep(3)  # the held ones reach the server (sockets: well within this)
    beyond = await asyncio.gather(*(long_poll(port, key, job, 5) for _ in range(extra)))
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    return list(beyond)


async def measure(port: int, pid: int, keys: list[str], args: argparse.Namespace) -> dict:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=WAIT * 3) as client:
        limit_key, probe_key, *waiting_keys = keys
        await probes(client, probe_key, 20)  # warm-up
        figures: dict[str, Any] = {"idle_cpu": await cpu_percent(pid, args.idle_seconds)}
        figures["idle_live"], figures["idle_post"] = await probes(client, probe_key, args.probes)
        opened = time.monotonic()
        polls, held = await open_waiters(client, port, waiting_keys, args)
        figures["submit_seconds"] = time.monotonic() - opened
        await asyncio.sleep(args.ramp + args.settle)  # all open, then the start-up is over
        print(f"waiters open: measuring the API (pid {pid})", file=sys.stderr, flush=True)
        figures["busy_cpu"] = await cpu_percent(pid, args.idle_seconds)
        figures["busy_live"], figures["busy_post"] = await probes(client, probe_key, args.probes)
        # Every stream must still be open (a refused or failed one has ended).
        ended = [(t.get_name(), t.result().status) for t in held if t.done() and not t.exception()]
        figures["streams_ended_early"] = dict(Counter(ended)) or 0
        ended = await asyncio.gather(*polls)
        figures["poll_statuses"] = sorted({answer.status for answer in ended})
        figures["poll_seconds"] = [answer.seconds for answer in ended]
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        figures["beyond_limit"] = await limit_check(client, port, limit_key, args.extra)
    return figures


def spawn_api(port: int, env: dict[str, str], log: Path, code: Path) -> subprocess.Popen[bytes]:
    """``tierq api`` run from the checkout ``code`` (``-m`` imports from its directory)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [PY, "-m", "cli", "api", "--port", str(port)],
            env={**os.environ, **env}, cwd=code, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    from tierq.migrate import upgrade

    home = Path(tempfile.mkdtemp(prefix=f"tierq-waiters-{mode}-"))
    database = redis = None
    env = {"TIERQ_HOME": str(home), "TIERQ_DATABASE_URL": "", "TIERQ_BROKER_URL": ""}
    if mode == "postgres":
        database, redis = SharedDatabase(), RedisServer()
        env.update(TIERQ_DATABASE_URL=database.url, TIERQ_BROKER_URL=redis.url)
    url = env["TIERQ_DATABASE_URL"] or f"sqlite:///{(home / 'tierq.db').resolve()}"
    upgrade(url)
    port = free_port()
    code = (args.code or ROOT).resolve()
    api = spawn_api(port, env, home / "api.log", code)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live")
        keys = make_keys(url, args.keys + 1)
        return asyncio.run(measure(port, api.pid, keys, args))
    finally:
        api.kill()
        api.wait()
        if redis is not None:
            redis.stop()
        if database is not None:
            database.drop()


def report(mode: str, f: dict, args: argparse.Namespace) -> None:
    seconds = sorted(f["poll_seconds"]) or [0.0]
    refused = [answer for answer in f["beyond_limit"] if answer.status == 429]
    print(f"\n{mode}: {args.long_polls} long-polls + {args.streams} SSE streams "
          f"({args.keys} keys); their jobs submitted in {f['submit_seconds']:.1f} s, opened "
          f"over {args.ramp:g} s, measured after {args.settle:g} s more")  # fmt: skip
    print("| | idle | waiters open | ratio |\n|---|---|---|---|")
    for name, idle, busy in (
        ("`/health/live` p50", f["idle_live"], f["busy_live"]),
        ("`POST /v1/jobs` p50", f["idle_post"], f["busy_post"]),
    ):
        print(f"| {name} | {idle:.1f} ms | {busy:.1f} ms | {busy / idle:.2f}x |")
    print(f"| API CPU, nothing else to do | {f['idle_cpu']:.1f} % | {f['busy_cpu']:.1f} % | |")
    print(f"long-polls (wait={WAIT}): statuses {f['poll_statuses']}, lasted p50 "
          f"{statistics.median(seconds):.1f} s, max {seconds[-1]:.1f} s; "
          f"streams that ended early (kind, status): {f['streams_ended_early']}")  # fmt: skip
    print(f"a key at its {LIMIT} waiters: {len(refused)} of {len(f['beyond_limit'])} more "
          f"refused 429 (Retry-After {sorted({a.retry_after for a in refused})}), in at most "
          f"{max((a.seconds for a in refused), default=0) * 1000:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "postgres", "sqlite"], default="both")
    parser.add_argument("--long-polls", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=15.0, help="seconds to open them over")
    parser.add_argument("--settle", type=float, default=5.0, help="then quiet, before CPU")
    parser.add_argument("--extra", type=int, default=10)
    parser.add_argument("--code", type=Path, default=None, help="a checkout to run the API from")
    args = parser.parse_args()
    modes = ["postgres", "sqlite"] if args.mode == "both" else [args.mode]
    for mode in modes:
        report(mode, run_mode(mode, args), args)


if __name__ == "__main__":
    main()
