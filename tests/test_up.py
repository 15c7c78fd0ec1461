"""The README's first command: `tierq up` on the zero-install default answers a job, and
Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.services import free_port, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_up_answers_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERQ_")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port)],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None,
            90,
            0.3,
            what="tierq up",
        )
        text = log.read_text()
        assert up.poll() is None, text
        key = re.search(r"API key\s+(tq_\S+)", text).group(1)  # type: ignore[union-attr]
        children = _children_of(up.pid)
        assert len(children) == 7  # simulator, beat, api, three tier workers, webhooks
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hello up"}]}
        job = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=body, headers=headers).json()
        done = httpx.get(
            f"http://127.0.0.1:{port}/v1/jobs/{job['id']}",
            params={"wait": 30},
            headers=headers,
            timeout=40,
        ).json()
        assert done["status"] == "succeeded", done
        assert done["served_by"]["tier"] == "gpu"
        assert (tmp_path / "var" / "tierq.db").exists()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    time.sleep(0.5)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]
    assert alive == [], f"left running: {alive}"
    assert "stopped" in log.read_text()


def test_up_prints_no_password() -> None:
    from cli.up import _banner
    from tierq.config import load_config
    from tierq.settings import Settings

    settings = Settings(
        database_url="postgresql+psycopg://tierq:db-hunter2@db.internal:5432/tierq",
        broker_url="sentinel://:mq-hunter2@s1:26379;sentinel://:mq-hunter2@s2:26379",
    )
    banner = _banner(settings, load_config(), "http://127.0.0.1:8000", "tq_k", Path("/logs"))
    assert "hunter2" not in banner
    assert "postgresql+psycopg://tierq:***@db.internal:5432/tierq" in banner
    assert "@s1:26379" in banner and "@s2:26379" in banner
