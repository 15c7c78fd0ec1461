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
                f"circuit={d['circuit']:9} {_switch_state(d)}"
            )


def _switch_state(described: dict[str, object]) -> str:
    if described["retired"]:
        return "DISABLED (retired now)"
    return "DISABLED" if described["disabled"] else ""


def _switch(name: str, disabled: bool, now: bool = False) -> None:
    config = load_config(get_settings().config)
    try:
        with session_scope() as session:
            operations.set_disabled(session, config, name, disabled, now)
    except operations.UnknownBackend as exc:
        raise click.ClickException(f"no backend '{name}' in the tier configuration") from exc
    if not disabled:
        click.echo(f"{name} enabled")
    elif now:
        click.echo(f"{name} retired: its calls in flight are aborted and rerouted")
    else:
        click.echo(f"{name} disabled: no new call goes to it")


@backends.command("disable")
@click.argument("name")
@click.option(
    "--now",
    is_flag=True,
    help="Also abort its calls in flight (rerouted to the next live backend or tier) and "
    "stop serving cached answers it produced: a model that must be retired at once.",
)
def backends_disable(name: str, now: bool) -> None:
    """Stop sending calls to NAME; queued jobs route elsewhere, calls in flight finish."""
    _switch(name, True, now)


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
