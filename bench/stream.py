"""Streaming overhead: time to first token and tokens per second through tierq, next to
the same simulated backend called directly, in the same run, as ratios.

Run:  .venv/bin/python bench/stream.py [--rounds 20] [--tokens-per-second 200]

Postgres (fresh database), a throwaway Redis, the API, one gpu worker and the relay, all
real processes; the simulator streams an answer of ~120 words at the given pace. Both
sides are read with the official openai SDK, interleaved round by round.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import spawn, wait_http
from bench.submit import make_key
from tests.services import RedisServer, SharedDatabase, free_port
from tests.stack import tier_file
from tierq.migrate import upgrade

PY = sys.executable
QUESTION = [{"role": "user", "content": " ".join(f"word{i}" for i in range(120))}]


def measure(client: OpenAI) -> tuple[float, float]:
    """(seconds to the first token, tokens per second after it)."""
    started = time.perf_counter()
    first, count = None, 0
    stream = client.chat.completions.create(model="m", messages=QUESTION, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            count += 1
    ended = time.perf_counter()
    assert first is not None and count > 1, count
    return first - started, (count - 1) / (ended - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens-per-second", type=float, default=200)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="tierq-stream-"))
    redis, database = RedisServer(), SharedDatabase()
    upgrade(database.url)
    sim_port, api_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    env = {
        "TIERQ_DATABASE_URL": database.url,
        "TIERQ_BROKER_URL": redis.url,
        "TIERQ_HOME": str(logs),
        "TIERQ_CONFIG": str(tier_file(logs, {"gpu": [("sim", "openai", sim_url)]})),
    }
    processes = [
        spawn([PY, "-m", "cli", "simulate", "--backend", f"sim={sim_port}"], env, logs / "sim.log"),
        spawn([PY, "-m", "cli", "api", "--port", str(api_port)], env, logs / "api.log"),
        spawn([PY, "-m", "cli", "relay"], env, logs / "relay.log"),
        spawn(
            [
                PY,
                "-m",
                "cli",
                "worker",
                "--tier",
                "gpu",
                "--calls",
                "1",
                "--loglevel",
                "WARNING",
            ],
            env,
            logs / "worker.log",
        ),
    ]
    try:
        wait_http(f"{sim_url}/_sim/state")
        wait_http(f"http://127.0.0.1:{api_port}/health/live")
        httpx.put(
            f"{sim_url}/_sim/faults", json={"tokens_per_second": args.tokens_per_second}
        ).raise_for_status()
        direct = OpenAI(base_url=f"{sim_url}/v1", api_key="x", max_retries=0)
        tierq = OpenAI(
            base_url=f"http://127.0.0.1:{api_port}/v1",
            api_key=make_key(database.url),
            max_retries=0,
            timeout=60,
        )
        time.sleep(3)  # the worker comes up
        measure(tierq)  # warm-up
        direct_runs, tierq_runs = [], []
        for _ in range(args.rounds):
            direct_runs.append(measure(direct))
            tierq_runs.append(measure(tierq))
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        redis.stop()
        database.drop()
    ttft_d = statistics.median(r[0] for r in direct_runs) * 1000
    ttft_t = statistics.median(r[0] for r in tierq_runs) * 1000
    tps_d = statistics.median(r[1] for r in direct_runs)
    tps_t = statistics.median(r[1] for r in tierq_runs)
    print(f"streaming, {args.rounds} rounds, simulator pace {args.tokens_per_second:g} tok/s")
    print(
        f"  time to first token  direct {ttft_d:7.1f} ms   tierq {ttft_t:7.1f} ms   "
        f"ratio {ttft_t / ttft_d:.2f}  (+{ttft_t - ttft_d:.1f} ms)"
    )
    print(
        f"  tokens per second    direct {tps_d:7.1f}      tierq {tps_t:7.1f}      "
        f"ratio {tps_t / tps_d:.2f}"
    )
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
