"""``tierq up``: the whole system as child processes of one command, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click
import httpx

from tierq.config import load_config
from tierq.db import session_scope
from tierq.keys import create_key
from tierq.migrate import upgrade
from tierq.settings import get_settings

STOP_GRACE = 15.0


def _spawn(name: str, args: list[str]) -> tuple[str, subprocess.Popen[bytes]]:
    # Each child leads its own process group so Ctrl-C reaches us once, and we stop them.
    process = subprocess.Popen([sys.executable, "-m", "cli", *args], start_new_session=True)
    return name, process


def _wait_ready(url: str, children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    deadline = time.monotonic() + 30
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
    raise click.ClickException("the API did not become ready within 30 s")


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _, process in children:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for _, process in children:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def run_all(port: int, concurrency: int) -> None:
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    config = load_config(settings.config)
    upgrade(settings.effective_database_url)
    with session_scope() as session:
        key = create_key(session, "tierq-up", is_admin=True).key
    children = [
        _spawn("simulator", ["simulate"]),
        _spawn("beat", ["beat"]),
        _spawn("api", ["api", "--port", str(port)]),
    ]
    children += [
        _spawn(
            f"worker {tier}",
            ["worker", "--tier", tier, "--concurrency", str(concurrency), "--loglevel", "WARNING"],
        )
        for tier in config.tier_names
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, children)
        click.echo(f"""
tierq is up (database {settings.effective_database_url}, broker {settings.effective_broker_url})
  API        {url}   (OpenAPI docs at {url}/docs)
  workers    {", ".join(config.tier_names)}   tier config version {config.version}
  backends   simulated: {", ".join(b.name + " " + b.url for b in config.backends.values())}
  API key    {key}   (admin; shown once)

Try:  export TIERQ_KEY={key}
      tierq submit "Hello, who answers?"
Ctrl-C stops everything.""")
        while all(process.poll() is None for _, process in children):
            time.sleep(0.5)
        crashed = [name for name, process in children if process.poll() is not None]
        click.echo(f"stopping: {', '.join(crashed)} exited", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        _stop(children)
