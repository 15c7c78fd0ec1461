"""The ``tierq`` command: starts each part of tierq on its own, or all of them (``up``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import click

from cli.client import client_commands
from cli.operate import operator_commands
from tierq.config import ConfigError, TierqConfig, load_config
from tierq.settings import get_settings

# Webhook deliveries in flight per webhooks worker (receivers are slow, not batched).
WEBHOOK_DELIVERIES = 8


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tierq: a durable request queue for LLM inference.

    Settings come from TIERQ_* environment variables (TIERQ_DATABASE_URL,
    TIERQ_BROKER_URL, TIERQ_CONFIG, ...); with none set, tierq runs on SQLite and a
    folder broker under ./var.
    """


@main.command()
@click.option("--host", default=None, help="Interface to bind (default TIERQ_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default TIERQ_API_PORT, 8000).")
@click.option("--workers", type=int, default=1, show_default=True, help="Server processes.")
@click.option(
    "--keep-alive",
    type=int,
    default=None,
    help="Idle seconds a client connection is kept (default TIERQ_API_KEEP_ALIVE, 75); "
    "above a load balancer's idle timeout, so it never reuses a connection we just closed.",
)
def api(host: str | None, port: int | None, workers: int, keep_alive: int | None) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "api.main:app",
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        timeout_keep_alive=keep_alive or settings.api_keep_alive,
        # h11, not httptools: only h11 bounds the request line and headers (httptools
        # buffers a header of any size); over the bound uvicorn answers 400 and closes.
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        log_level="warning",
        access_log=False,
    )


@main.command()
@click.option("--tier", required=True, help="The tier whose queue this worker consumes.")
@click.option(
    "--calls",
    type=click.IntRange(min=1),
    default=None,
    help="Backend calls this worker keeps in flight at once [default: the sum of the "
    "tier's backends' max_concurrency, so one worker fills every backend's batch].",
)
@click.option(
    "--name",
    default=None,
    help="This worker's name, unique among running workers [default: TIER-<random>@HOST]; "
    "it owns the leases it hands back when it stops.",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(tier: str, calls: int | None, name: str | None, loglevel: str) -> None:
    """Run a Celery worker for one tier (e.g. --tier gpu on a GPU box)."""
    settings = get_settings()
    config = _config_or_exit(settings.config)
    if tier not in (*config.tier_names, "webhooks"):  # "webhooks": the delivery queue
        raise click.BadParameter(f"no tier '{tier}' in {config.tier_names}", param_hint="--tier")
    from worker.celery_app import app

    # SIGTERM is Celery's warm shutdown: it stops taking messages and waits for the jobs
    # running. tierq bounds that wait itself (worker.celery_app: the calls still in flight
    # after worker_soft_shutdown_timeout - 2 s are stopped and their jobs handed back), so the
    # cold shutdown, which cannot stop a threads pool's tasks, is not needed.
    os.environ["TIERQ_WORKER_TIER"] = tier
    # An environment carried over from the prefork worker (REMAP_SIGTERM=SIGQUIT) would turn
    # SIGTERM into the cold shutdown, which fails on the threads pool and hands nothing over.
    os.environ.pop("REMAP_SIGTERM", None)
    app.worker_main(
        [
            "worker",
            "-Q",
            tier,
            "-n",
            name or f"{tier}-{uuid.uuid4().hex[:8]}@%h",
            # Threads, not processes: a job's thread waits on its call, which runs on the
            # process's event loop; each in-flight call costs a thread's stack, not a process.
            "--pool=threads",
            f"--concurrency={calls or default_calls(config, tier)}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def default_calls(config: TierqConfig, tier: str) -> int:
    """As many calls as the tier's backends take at once (their caps are counted across all
    workers in the database, so a second worker of the tier never oversubscribes them)."""
    if tier == "webhooks":
        return WEBHOOK_DELIVERIES
    return sum(b.max_concurrency for b in config.tier(tier).backends)


@main.command()
def relay() -> None:
    """Run the relay alone: publish queued jobs, reclaim expired leases, wake due jobs,
    replay parked jobs."""
    _run_relay(probes=False)


@main.command()
def beat() -> None:
    """Run the periodic duties: the relay and the backend health probes (one active
    instance across machines)."""
    _run_relay(probes=True)


def _run_relay(probes: bool) -> None:
    from cli.logs import setup_logging
    from worker.health import Prober
    from worker.relay import run_forever

    setup_logging()
    settings = get_settings()
    config = _config_or_exit(settings.config)
    run_forever(config, settings, Prober(config) if probes else None)


@main.command()
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower, Celery's monitor, against tierq's broker (queues, workers, tasks)."""
    from celery.bin.celery import celery as celery_command

    # Flower is a `celery` subcommand; run it exactly as `celery -A ... flower` would.
    celery_command.main(
        args=["-A", "worker.celery_app:app", "flower", f"--port={port}", f"--address={address}"],
        prog_name="tierq flower",
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="NAME=PORT",
    help="A simulated backend; repeatable. Default: every loopback backend in the "
    "tier configuration.",
)
def simulate(host: str, backends: tuple[str, ...]) -> None:
    """Serve fault-injectable simulated backends (OpenAI, Ollama and Anthropic protocols)."""
    from simulator.server import serve_forever

    specs = [_parse_backend(b) for b in backends] or _loopback_backends()
    for name, port in specs:
        click.echo(f"simulating {name} on http://{host}:{port}")
    serve_forever(specs, host)


def _parse_backend(value: str) -> tuple[str, int]:
    name, _, port = value.partition("=")
    if not name or not port.isdigit():
        raise click.BadParameter(f"expected NAME=PORT, got {value!r}", param_hint="--backend")
    return name, int(port)


def _loopback_backends() -> list[tuple[str, int]]:
    from urllib.parse import urlsplit

    config = _config_or_exit(get_settings().config)
    specs = []
    for backend in config.backends.values():
        url = urlsplit(backend.url)
        if url.hostname in ("127.0.0.1", "localhost") and url.port:
            specs.append((backend.name, url.port))
    return specs


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    from tierq.migrate import upgrade

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    click.echo("database is at the latest schema")


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Operator rights (disable backends, replay).")
@click.option(
    "--webhook-url",
    default=None,
    metavar="URL",
    help="Default receiver of this key's job webhooks (a job's own webhook_url wins).",
)
@click.option(
    "--cancel-on-disconnect",
    is_flag=True,
    help="A chat-completions client of this key that disconnects before its answer cancels "
    "its job (a request's x-tierq-cancel-on-disconnect header wins). Default: the job is kept.",
)
@click.option(
    "--rps",
    type=click.FloatRange(min=0),
    default=None,
    help="Requests per second of this key, per API process (default TIERQ_KEY_RPS; 0: none).",
)
@click.option(
    "--max-jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Jobs of this key not ended at once; more are refused at submit (default "
    "TIERQ_KEY_MAX_JOBS; 0: none).",
)
@click.option(
    "--max-waiters",
    type=click.IntRange(min=0),
    default=None,
    help="Long-polls, event streams and waiting chat calls of this key at once, per API "
    "process (default TIERQ_KEY_MAX_WAITERS; 0: none).",
)
def keys_create(
    name: str,
    admin: bool,
    webhook_url: str | None,
    cancel_on_disconnect: bool,
    rps: float | None,
    max_jobs: int | None,
    max_waiters: int | None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash. The second line
    is the key's webhook signing secret (Standard Webhooks), also printed only this once.
    Over a limit a request gets a 429 with Retry-After."""
    from tierq.db import session_scope
    from tierq.keys import create_key

    try:
        with session_scope() as session:
            created = create_key(
                session,
                name,
                is_admin=admin,
                webhook_url=webhook_url,
                cancel_on_disconnect=cancel_on_disconnect,
                rps=rps,
                max_jobs=max_jobs,
                max_waiters=max_waiters,
            )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--webhook-url") from exc
    click.echo(created.key)
    click.echo(f"webhook secret: {created.webhook_secret}")


@main.group()
def config() -> None:
    """Inspect the tier configuration."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a tier file without starting anything; prints its version (hash)."""
    loaded = _config_or_exit(path)
    click.echo(f"{path}: ok, version {loaded.version}, tiers: {' → '.join(loaded.tier_names)}")


def _config_or_exit(path: Path | None):  # type: ignore[no-untyped-def]
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--port", type=int, default=8000, show_default=True, help="API port.")
@click.option(
    "--calls",
    type=click.IntRange(min=1),
    default=None,
    help="Backend calls in flight per tier worker [default: the tier's total max_concurrency].",
)
def up(port: int, calls: int | None) -> None:
    """Start everything on this machine: API, one worker per tier, beat, simulators."""
    from cli.up import run_all

    run_all(port, calls)


for command in [*client_commands, *operator_commands]:
    main.add_command(command)
