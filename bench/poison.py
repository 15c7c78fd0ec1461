"""One key's poison-shaped requests must not slow another key's jobs.

Run:  .venv/bin/python bench/poison.py [--jobs 40] [--poison 16]

A real deployment (Postgres, Redis, an API, a relay, gpu and cpu workers, simulated
backends; tests/deployment.py). The victim key submits jobs one after another and long-polls
each to its end, alone (the same-run baseline), then while the attacker key sends its
poison: the requests that once crashed a worker while it encoded them (a lone UTF-16
surrogate in ``stop``, in ``user``, in a message, in a conversation's ``system``; issue 11),
each sent as JSON with ``\\u`` escapes, as a client would. Printed: the victim's p50 and p99
alone and beside the poison, their ratio (the aim: within 2x), and what the poison got.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.deployment import Deployment, _make_key, deployment

SURROGATE = "\ud800"
POISONS = [
    {"stop": [SURROGATE]},
    {"user": f"user{SURROGATE}"},
    {"messages": [{"role": "user", "content": f"hello {SURROGATE}"}]},
]


def victim_latencies(d: Deployment, jobs: int) -> list[float]:
    took = []
    with d.client() as client:
        for i in range(jobs):
            started = time.perf_counter()
            job = d.submit(client, f"victim {i}").json()
            ended = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
            assert ended["status"] == "succeeded", ended
            took.append((time.perf_counter() - started) * 1000)
    return took


def poison(d: Deployment, key: str, count: int, statuses: list[int], stop: threading.Event) -> None:
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(base_url=d.stack.api_url, headers=headers, timeout=30) as client:
        conversation = {"system": f"be brief {SURROGATE}"}
        while not stop.is_set():
            for i in range(count):
                body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
                body |= POISONS[i % len(POISONS)]
                statuses.append(client.post("/v1/jobs", content=json.dumps(body)).status_code)
            statuses.append(
                client.post("/v1/conversations", content=json.dumps(conversation)).status_code
            )


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--poison", type=int, default=16)
    args = parser.parse_args()
    with deployment(Path(tempfile.mkdtemp(prefix="tierq-poison-"))) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        victim_latencies(d, 5)  # warm up
        alone = victim_latencies(d, args.jobs)
        statuses: list[int] = []
        stop = threading.Event()
        attacker = threading.Thread(
            target=poison, args=(d, _make_key(d.database_url), args.poison, statuses, stop)
        )
        attacker.start()
        try:
            beside = victim_latencies(d, args.jobs)
        finally:
            stop.set()
            attacker.join(30)
    print(f"victim: {args.jobs} jobs, submit + long-poll to the end, p50 / p99")
    print(f"  alone (baseline)       {p(alone, 50):7.1f} / {p(alone, 99):7.1f} ms")
    print(f"  beside the poison      {p(beside, 50):7.1f} / {p(beside, 99):7.1f} ms")
    print(f"  ratio p50: {p(beside, 50) / p(alone, 50):.2f} (aim: within 2x)")
    counted = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"poison requests sent: {len(statuses)}, answered {counted}")


if __name__ == "__main__":
    main()
