"""Operator commands that work on the database directly, so they work when the API is down."""

from __future__ import annotations

import click

from tierq import operations
from tierq.config import load_config
from tierq.db import session_scope
from tierq.settings import get_settings


@click.group()
def backends() -> None:
    """Inspect backends; disable one at once, enable it again."""


@backends.command("list")
def backends_list() -> None:
    """Each backend's tier, health, breaker state and operator switch."""
    with session_scope() as session:
        for row in operations.backends(session):
            d = operations.describe(row)
            click.echo(
                f"{d['name']:24} {d['tier']:10} health={d['health']:9} "
                f"circuit={d['circuit']:9} {'DISABLED' if d['disabled'] else ''}"
            )


def _switch(name: str, disabled: bool) -> None:
    config = load_config(get_settings().config)
    try:
        with session_scope() as session:
            operations.set_disabled(session, config, name, disabled)
    except operations.UnknownBackend as exc:
        raise click.ClickException(f"no backend '{name}' in the tier configuration") from exc
    click.echo(f"{name} {'disabled: no new call goes to it' if disabled else 'enabled'}")


@backends.command("disable")
@click.argument("name")
def backends_disable(name: str) -> None:
    """Stop sending calls to NAME now (e.g. retire a model); queued jobs route elsewhere."""
    _switch(name, True)


@backends.command("enable")
@click.argument("name")
def backends_enable(name: str) -> None:
    """Send calls to NAME again."""
    _switch(name, False)


@click.group()
def parked() -> None:
    """Jobs waiting in the emergency queue."""


@parked.command("list")
@click.option("--limit", type=int, default=50, show_default=True)
def parked_list(limit: int) -> None:
    """Parked jobs, highest priority and oldest first."""
    with session_scope() as session:
        for job in operations.parked(session, limit):
            click.echo(f"{job.id} priority={job.priority} since={job.updated_at} {job.error}")


@parked.command("replay")
@click.option("--limit", type=int, default=None, help="At most this many (default: all).")
def parked_replay(limit: int | None) -> None:
    """Release parked jobs now, whatever the health checks say."""
    config = load_config(get_settings().config)
    with session_scope() as session:
        released = operations.replay(session, config, limit)
    click.echo(f"replayed {len(released)} jobs")


operator_commands = [backends, parked]
