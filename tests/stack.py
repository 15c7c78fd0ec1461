"""A tierq deployment made of real processes: API, per-tier Celery workers, the relay."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import make_url

from tests.services import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def tier_file(folder: Path, tiers: dict[str, list[tuple[str, str, str]]], **extra: Any) -> Path:
    """Write a tier YAML: tiers maps name → [(backend name, protocol, url)]."""
    import yaml

    doc: dict[str, Any] = {
        "tiers": [
            {
                "name": name,
                "retry": {"attempts": 2, "base_delay": 0.05, "max_delay": 0.2},
                "backends": [
                    {
                        "name": b,
                        "protocol": p,
                        "url": u,
                        "model": f"{b}-model",
                        "connect_timeout": 0.5,
                        "read_timeout": 5,
                    }
                    for b, p, u in backends
                ],
            }
            for name, backends in tiers.items()
        ]
    }
    doc.update(extra)
    path = folder / f"tiers-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "cli", *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a process and any children it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.popen.wait(30)


class Stack:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.processes: list[Process] = []
        self.api_url = ""

    def spawn(self, name: str, *args: str, **env: str) -> Process:
        process = Process(name, list(args), {**self.env, **env}, self.logs)
        self.processes.append(process)
        return process

    def worker(
        self, tier: str, calls: int | None = None, name: str | None = None, **env: str
    ) -> Process:
        """A worker of ``tier`` keeping ``calls`` backend calls in flight (default: the
        tier's total max_concurrency), named ``name`` (default: unique)."""
        args = ["--calls", str(calls)] if calls else []
        args += ["--name", name] if name else []
        process = self.spawn(f"worker-{tier}", "worker", "--tier", tier, *args, **env)
        wait_until(
            lambda: "ready." in process.output() or not process.alive(),
            40,
            what=f"worker {tier} ready",
        )
        assert process.alive(), process.output()
        return process

    def relay(self) -> Process:
        return self.spawn("relay", "relay")

    def api(self, **env: str) -> Process:
        port = free_port()
        process = self.spawn("api", "api", "--port", str(port), **env)
        self.api_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: self._live() or not process.alive(), 30, what="api live")
        assert process.alive(), process.output()
        return process

    def _live(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for process in self.processes:
            if process.alive():
                process.kill_group(signal.SIGKILL)


def pg_connect(url: str) -> psycopg.Connection:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(dsn, autocommit=True)
