"""CPU of the submit path alone (validating the body and accepting the job on Postgres), for
two checkouts of tierq, alternately in one run: what a change to the request model or to
api/submit.py costs, without the HTTP server's and the machine's noise.

Run:  .venv/bin/python bench/submit_path.py BEFORE_DIR AFTER_DIR [--calls 1500] [--runs 3]

Each directory is a checkout (``git worktree add /tmp/before COMMIT``); each run of each
imports that checkout in a fresh process, on a fresh database, and times ``calls`` calls of
``JobCreate.model_validate_json`` + ``api.submit.accept`` (the broker publish stubbed) after
200 warm-up calls, in process CPU time. Printed: ms per call for each, and after / before.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = r"""
import json, os, sys, tempfile, time, uuid
repo, calls = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, repo)
os.environ["TIERQ_HOME"] = tempfile.mkdtemp()
from sqlalchemy import create_engine, text
admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                      isolation_level="AUTOCOMMIT")
name = "tierq_bench_" + uuid.uuid4().hex[:8]
with admin.connect() as c:
    c.execute(text(f"CREATE DATABASE {name}"))
url = os.environ["TIERQ_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
try:
    from tierq.migrate import upgrade
    upgrade(url)
    from tierq import broker
    broker.publish = lambda *a, **k: True
    from api.schemas import JobCreate
    from api.submit import accept
    from tierq.config import load_config
    from tierq.db import get_engine, session_scope
    from tierq.keys import create_key
    with session_scope() as s:
        owner = uuid.UUID(str(create_key(s, "bench").id))
    config = load_config()
    body = {"model": "m", "messages": [{"role": "user", "content": "benchmark"}],
            "max_tokens": 16}
    raw = json.dumps(body).encode()
    for _ in range(200):
        accept(owner, JobCreate.model_validate_json(raw), None, config)
    started = time.process_time()
    for _ in range(calls):
        accept(owner, JobCreate.model_validate_json(raw), None, config)
    print((time.process_time() - started) / calls * 1000)
finally:
    get_engine().dispose()
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE {name}"))
"""


def one_run(repo: Path, calls: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", ONE_RUN, str(repo), str(calls)],
        cwd=repo, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    before, after = [], []
    for _ in range(args.runs):
        before.append(one_run(args.before.resolve(), args.calls))
        after.append(one_run(args.after.resolve(), args.calls))
    b, a = statistics.median(before), statistics.median(after)
    print(f"validate + accept, {args.calls} calls, {args.runs} alternate runs (CPU ms per call)")
    print(f"  before {args.before}: " + ", ".join(f"{x:.3f}" for x in before) + f"  median {b:.3f}")
    print(f"  after  {args.after}: " + ", ".join(f"{x:.3f}" for x in after) + f"  median {a:.3f}")
    print(f"  after / before: {a / b:.2f}")


if __name__ == "__main__":
    main()
