"""``tierq up``: the whole system as child processes of one command, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click
import httpx
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import make_url

from tierq.config import TierqConfig, load_config
from tierq.db import session_scope
from tierq.keys import create_key
from tierq.migrate import upgrade
from tierq.settings import Settings, get_settings

STOP_GRACE = 20.0
Child = tuple[str, subprocess.Popen[bytes]]


def _spawn(name: str, args: list[str], logs: Path) -> Child:
    # Each child leads its own process group: Ctrl-C reaches only us, and we stop them.
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return name, process


def _children(config: TierqConfig, port: int, calls: int | None, logs: Path) -> list[Child]:
    children = [
        _spawn("simulator", ["simulate"], logs),
        _spawn("beat", ["beat"], logs),
        _spawn("api", ["api", "--port", str(port)], logs),
    ]
    for tier in config.tier_names:
        args = ["worker", "--tier", tier, *(["--calls", str(calls)] if calls else [])]
        children.append(_spawn(f"worker-{tier}", args, logs))
    # Webhook deliveries have a queue and worker of their own: a slow receiver never
    # holds up a job.
    args = ["worker", "--tier", "webhooks"]
    children.append(_spawn("worker-webhooks", args, logs))
    return children


def _wait_ready(url: str, children: list[Child]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name, process in children:
            if process.poll() is not None:
                raise click.ClickException(f"{name} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise click.ClickException("the API did not become ready within 60 s")


def _stop(children: list[Child]) -> None:
    for _, process in children:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for _, process in children:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops us as cleanly as Ctrl-C


def _shown(settings: Settings) -> tuple[str, str]:
    """The database and broker URLs as printed: passwords masked, since terminals end up
    in logs and screenshots."""
    database = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    # kombu takes several broker URLs separated by ";" (failover, sentinels)
    brokers = [_masked_broker(part) for part in settings.effective_broker_url.split(";")]
    return database, ";".join(brokers)


def _masked_broker(url: str) -> str:
    if "@" not in url:
        return url  # no credentials to hide: shown as configured
    try:
        return str(maybe_sanitize_url(url))
    except ValueError:  # not parseable, so it cannot be masked: show only its scheme
        return f"{url.partition('://')[0]}://…"


def _banner(settings: Settings, config: TierqConfig, url: str, key: str, logs: Path) -> str:
    backends = ", ".join(f"{b.name} {b.url}" for b in config.backends.values())
    database, broker = _shown(settings)
    return f"""
tierq is up (database {database}, broker {broker})
  API        {url}   (OpenAPI docs at {url}/docs)
  workers    {", ".join(config.tier_names)}   tier config version {config.version}
  backends   simulated: {backends}
  API key    {key}   (admin; shown once)
  logs       {logs}/

Try:  export TIERQ_KEY={key}
      .venv/bin/tierq submit "Hello, who answers?"
Ctrl-C stops everything."""


def run_all(port: int, calls: int | None) -> None:
    settings = get_settings()
    logs = (settings.home / "logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    config = load_config(settings.config)
    upgrade(settings.effective_database_url)
    with session_scope() as session:
        key = create_key(session, "tierq-up", is_admin=True).key
    signal.signal(signal.SIGTERM, _interrupt)
    url = f"http://127.0.0.1:{port}"
    children: list[Child] = []
    try:
        children = _children(config, port, calls, logs)
        _wait_ready(url, children)
        click.echo(_banner(settings, config, url, key, logs))
        while all(process.poll() is None for _, process in children):
            time.sleep(0.5)
        crashed = [name for name, process in children if process.poll() is not None]
        click.echo(f"stopping: {', '.join(crashed)} exited (see {logs}/)", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        _stop(children)
        click.echo("stopped", err=True)
