"""Operator controls, shared by the admin API and the CLI: disable or enable a backend at
once, list parked jobs, force a replay."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tierq import transitions
from tierq.config import TierqConfig
from tierq.db import db_now
from tierq.models import Backend, Job, JobStatus


class UnknownBackend(LookupError):
    pass


def set_disabled(
    session: Session, config: TierqConfig, name: str, disabled: bool, now: bool = False
) -> Backend:
    """Takes effect on the next routing decision of every worker: no new call goes to it.

    ``now`` (disabling only) retires it at once: every worker aborts its calls in flight on
    it within a second and reroutes those jobs to the next live backend or tier, and the
    minimal tier stops serving cached answers it produced (a model that must go now).
    Enabling clears both."""
    if name not in config.backends:
        raise UnknownBackend(name)
    row = session.get(Backend, name)
    if row is None:
        row = Backend(name=name, tier=config.tier_of(name).name)
        session.add(row)
    row.disabled = disabled
    # Only enable ends a retirement: a plain disable after --now keeps it retired.
    row.retired = (row.retired or now) if disabled else False
    session.flush()
    session.execute(update(Backend).where(Backend.name == name).values(updated_at=db_now()))
    return row


def backends(session: Session) -> list[Backend]:
    return list(session.scalars(select(Backend).order_by(Backend.tier, Backend.name)))


def parked(session: Session, limit: int = 100) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.PARKED)
            .order_by(Job.priority.desc(), Job.created_at)
            .limit(limit)
        )
    )


def replay(
    session: Session,
    config: TierqConfig,
    limit: int | None = None,
    job_ids: list[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """Release parked jobs now, whatever health says (the operator knows better), each to
    the tier it was parked on: the first step of its route that can serve it."""
    query = select(Job.id).where(Job.status == JobStatus.PARKED)
    if job_ids:
        query = query.where(Job.id.in_(job_ids))
    ids = session.scalars(query.order_by(Job.priority.desc(), Job.created_at).limit(limit)).all()
    return transitions.release_parked(session, list(ids), None, by="operator")


def describe(row: Backend) -> dict[str, Any]:
    return {
        "name": row.name,
        "tier": row.tier,
        "disabled": row.disabled,
        "retired": row.retired,
        "health": row.health,
        "circuit": row.circuit,
    }
