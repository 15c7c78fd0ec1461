"""Operator controls, shared by the admin API and the CLI: disable or enable a backend at
once, list parked jobs, force a replay."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tierq.config import TierqConfig
from tierq.db import db_now
from tierq.events import record_event
from tierq.models import Backend, Job, JobStatus


class UnknownBackend(LookupError):
    pass


def set_disabled(session: Session, config: TierqConfig, name: str, disabled: bool) -> Backend:
    """Takes effect on the next routing decision of every worker: no new call goes to it."""
    if name not in config.backends:
        raise UnknownBackend(name)
    row = session.get(Backend, name)
    if row is None:
        row = Backend(name=name, tier=config.tier_of(name).name)
        session.add(row)
    row.disabled = disabled
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
    """Release parked jobs now, whatever health says (the operator knows better)."""
    query = select(Job.id).where(Job.status == JobStatus.PARKED)
    if job_ids:
        query = query.where(Job.id.in_(job_ids))
    ids = session.scalars(query.order_by(Job.priority.desc(), Job.created_at).limit(limit)).all()
    return release_parked(session, list(ids), config.tier_names[0], by="operator")


def release_parked(session: Session, ids: list[uuid.UUID], tier: str, by: str) -> list[uuid.UUID]:
    """parked → queued on ``tier`` (the relay publishes them); the one way out of parking."""
    if not ids:
        return []
    released = session.scalars(
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.PARKED)
        .values(
            status=JobStatus.QUEUED, tier=tier, published_at=None, due_at=None, updated_at=db_now()
        )
        .returning(Job.id)
    ).all()
    for job_id in released:
        record_event(session, job_id, "replayed", tier=tier, by=by)
    return list(released)


def describe(row: Backend) -> dict[str, Any]:
    return {
        "name": row.name,
        "tier": row.tier,
        "disabled": row.disabled,
        "health": row.health,
        "circuit": row.circuit,
    }
