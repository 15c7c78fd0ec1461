"""What a 100 MB body with no key costs the API process, and what h11 costs per request.

Run:  .venv/bin/python bench/big_body.py [--mb 100] [--requests 3000]

One `tierq api` process (Postgres database of its own on 127.0.0.1:5432, a throwaway
Redis). The baseline is the same process's RSS after an ordinary request (`POST /v1/jobs`
with no key: 401). Then, for each case, the process's peak RSS (VmHWM, reset first through
/proc/PID/clear_refs) and its RSS afterwards, both as growth over that baseline:
- an ordinary request again (the noise floor);
- a body of --mb MB with its Content-Length (refused by the header, nothing read);
- the same body chunked (counted as it streams in, refused past TIERQ_MAX_BODY_BYTES).
The same cases run against a second API process with the limit raised past the body
(TIERQ_MAX_BODY_BYTES=1 GiB): what the body would cost without it.

Second part: `tierq api` serves with h11 because only h11 bounds the headers' memory; the
same app under httptools (uvicorn's default when installed) shows what that costs, as
server CPU per `POST /v1/jobs` (202, the real submit path), in interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, load, make_key, spawn, wait_http
from tests.services import RedisServer, SharedDatabase, free_port
from tests.test_limits import MB, memory_kib, reset_peak, send_body
from tierq.migrate import upgrade

BODY = {"model": "m", "messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 16}
PY = sys.executable
UNLIMITED = str(1024**3)


def start_api(env: dict[str, str], logs: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = spawn([PY, "-m", "cli", "api", "--port", str(port)], env, logs / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/health/live")
    return process, port


def ordinary(port: int) -> bytes:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=BODY)
    return f"HTTP/1.1 {response.status_code}".encode()


def measure(
    pid: int, baseline_kib: int, send: Callable[[], bytes]
) -> tuple[str, float, float, float]:
    """(status line, peak growth MB, RSS-after growth MB, seconds) of one request."""
    reset_peak(pid)
    started = time.perf_counter()
    answer = send()
    seconds = time.perf_counter() - started
    after = memory_kib(pid)
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "none"
    grow = lambda kib: (kib - baseline_kib) * 1024 / MB  # noqa: E731
    return status, grow(after["VmHWM"]), grow(after["VmRSS"]), seconds


def bench_memory(env: dict[str, str], logs: Path, mb: int) -> None:
    total = mb * MB
    for label, extra in (
        ("default limits", {}),
        ("TIERQ_MAX_BODY_BYTES=1 GiB", {"TIERQ_MAX_BODY_BYTES": UNLIMITED}),
    ):
        process, port = start_api({**env, **extra}, logs, f"api-{len(extra)}")
        try:
            ordinary(port)  # warms the code up: the baseline is the RSS after it
            baseline = memory_kib(process.pid)["VmRSS"]
            cases = (
                ("ordinary request (no key)", partial(ordinary, port)),
                (f"{mb} MB, Content-Length, no key", partial(send_body, port, total, False)),
                (f"{mb} MB, chunked, no key", partial(send_body, port, total, True)),
            )
            print(f"{label}: baseline RSS after an ordinary request {baseline / 1024:.1f} MiB")
            for name, send in cases:
                status, peak, rss, seconds = measure(process.pid, baseline, send)
                print(
                    f"  {name:34s} answer {status}  peak RSS +{peak:6.1f} MB  "
                    f"RSS after +{rss:6.1f} MB  {seconds:5.2f} s"
                )
        finally:
            os.killpg(process.pid, signal.SIGKILL)


def bench_parsers(env: dict[str, str], logs: Path, requests: int, rounds: int) -> None:
    h11, h11_port = start_api(env, logs, "api-h11")
    tools_port = free_port()
    args = ["-m", "uvicorn", "api.main:app", "--port", str(tools_port), "--http", "httptools"]
    tools = spawn([PY, *args, "--log-level", "warning", "--no-access-log"], env, logs / "ht.log")

    def caller(port: int):  # type: ignore[no-untyped-def]
        # A key per run: a key's jobs queued at once may be capped, and none of them runs.
        headers = {"Authorization": f"Bearer {make_key(env['TIERQ_DATABASE_URL'])}"}

        async def call(client: httpx.AsyncClient) -> None:
            url = f"http://127.0.0.1:{port}/v1/jobs"
            response = await client.post(url, json=BODY, headers=headers)
            assert response.status_code == 202, response.text

        return call

    try:
        wait_http(f"http://127.0.0.1:{tools_port}/health/live")
        servers = (("h11 (tierq api)", h11, h11_port), ("httptools", tools, tools_port))
        cpu = {name: 0.0 for name, _, _ in servers}
        for _, _, port in servers:
            asyncio.run(load(caller(port), 100, 16))  # warm up
        for _ in range(rounds):  # interleaved: load from elsewhere falls on both
            for name, process, port in servers:
                before = cpu_seconds(process.pid)
                asyncio.run(load(caller(port), requests // rounds, 16))
                cpu[name] += cpu_seconds(process.pid) - before
    finally:
        for process in (h11, tools):
            os.killpg(process.pid, signal.SIGKILL)
    print(f"POST /v1/jobs (202), concurrency 16, {requests} requests each, {rounds} rounds")
    for name, seconds in cpu.items():
        print(f"  {name:18s} server CPU {seconds * 1000 / requests:.2f} ms/request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the hostile body")
    parser.add_argument("--requests", type=int, default=3000, help="per parser; 0: skip")
    parser.add_argument("--rounds", type=int, default=5, help="at most 1000 requests each")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="tierq-bench-"))
    redis, database = RedisServer(), SharedDatabase()
    upgrade(database.url)
    env = {
        "TIERQ_DATABASE_URL": database.url,
        "TIERQ_BROKER_URL": redis.url,
        "TIERQ_HOME": str(logs),
    }
    try:
        bench_memory(env, logs, args.mb)
        if args.requests:
            bench_parsers(env, logs, args.requests, args.rounds)
    finally:
        redis.stop()
        database.drop()


if __name__ == "__main__":
    main()
