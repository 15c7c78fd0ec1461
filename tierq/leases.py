"""Leases: who owns a running job, for how long, and which backend call slot it holds.

A worker owns a job only while its lease token is on the row. Every write after the claim
checks that token (``tierq.transitions``), so a worker that lost its lease (it stalled, the
relay re-queued the job, another worker claimed it) can never write a second answer.

A call slot is ``jobs.calling_backend``: the backend's calls in flight are the jobs that name
it under a lease that has not run out (database clock). A cancelled job keeps its slot until
its worker's call has really stopped, so a backend never gets more calls than its cap.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Float, Integer, and_, bindparam, exists, func, select, tuple_, update
from sqlalchemy.orm import Session

from tierq.db import db_now
from tierq.events import record_event
from tierq.models import ACTIVE_STATUSES, Backend, Job, JobStatus
from tierq.policy import StopReason


@dataclass(frozen=True)
class Lease:
    job_id: uuid.UUID
    token: uuid.UUID
    owner: str


# The hot statements are built once, on the table (no ORM bookkeeping), with bound
# parameters: building a statement costs more Python time than running it.
jobs = Job.__table__
_other = jobs.alias("other_job")
_backends = Backend.__table__


def param(name: str, column: str) -> Any:
    return bindparam(name, type_=jobs.c[column].type)


def in_flight(job: Any) -> Any:
    """``job`` (the Job entity, or a table's columns) holds a call slot: it names a backend
    under a lease that has not run out, so a worker that died mid-call stops counting when
    its lease expires. Whatever the status: a cancelled job's call counts until it stopped."""
    return job.calling_backend.is_not(None) & (job.lease_expires_at > db_now())


SECONDS = bindparam("p_seconds", type_=Float())
IS_LEASE = and_(
    jobs.c.id == param("p_job", "id"), jobs.c.lease_token == param("p_token", "lease_token")
)
HOLDS_LEASE = and_(IS_LEASE, jobs.c.status == JobStatus.RUNNING)
_CLAIM_UPDATE = (
    update(jobs)
    .where(
        jobs.c.id == param("p_job", "id"),
        jobs.c.status == JobStatus.QUEUED,
        jobs.c.tier == param("p_tier", "tier"),
        ~exists().where(_other.c.id == jobs.c.after_job_id, _other.c.status.in_(ACTIVE_STATUSES)),
    )
    .values(
        status=JobStatus.RUNNING,
        lease_token=param("p_token", "lease_token"),
        lease_owner=param("p_owner", "lease_owner"),
        lease_expires_at=db_now(SECONDS),
        deliveries=jobs.c.deliveries + 1,
        calling_backend=None,  # a dead worker's call is not ours
        updated_at=db_now(),
    )
)
# The claimed row itself, as the ORM's Job: the claim and the job's read in one statement.
_CLAIM_JOB = select(Job).from_statement(_CLAIM_UPDATE.returning(*jobs.c))
_START_CALL = (
    update(jobs)
    .where(
        HOLDS_LEASE,
        select(func.count())
        .where(
            in_flight(_other.c),
            _other.c.calling_backend == param("p_backend", "calling_backend"),
            _other.c.id != param("p_job", "id"),
        )
        .scalar_subquery()
        < bindparam("p_cap", type_=Integer()),
    )
    # The lease starts again here: the wait for the slot locks is not the call's time.
    .values(calling_backend=param("p_backend", "calling_backend"), lease_expires_at=db_now(SECONDS))
    .returning(jobs.c.id)
)
_END_CALL = update(jobs).where(HOLDS_LEASE).values(calling_backend=None)
# A call stopped on a job that ended without us (cancelled): its slot is free only now.
_LET_GO = (
    update(jobs)
    .where(IS_LEASE, jobs.c.status != JobStatus.RUNNING)
    .values(calling_backend=None, lease_token=None, lease_owner=None, lease_expires_at=None)
)


def lease_params(lease: Lease) -> dict[str, Any]:
    return {"p_job": lease.job_id, "p_token": lease.token}


def claim(
    session: Session, job_id: uuid.UUID, tier: str, owner: str, seconds: float
) -> Lease | None:
    """queued → running, if the job is queued on this tier and the job before it has ended.

    None means the message was a duplicate, stale (the job moved on) or early (blocked).
    """
    claimed = claim_and_load(session, job_id, tier, owner, seconds)
    return claimed[0] if claimed else None


def claim_and_load(
    session: Session, job_id: uuid.UUID, tier: str, owner: str, seconds: float
) -> tuple[Lease, Job, float | None] | None:
    """``claim``, also returning the claimed job and the seconds left before its deadline
    at the claim (database clock), read by the claim's own statement."""
    token = uuid.uuid4()
    params = {"p_job": job_id, "p_tier": tier, "p_token": token, "p_owner": owner}
    job = session.scalars(_CLAIM_JOB, {**params, "p_seconds": seconds}).one_or_none()
    if job is None:
        return None
    record_event(session, job_id, "claimed", worker=owner, tier=tier)
    time_left = None
    if job.deadline is not None and job.lease_expires_at is not None:
        # The lease runs ``seconds`` from the claim's database time.
        claimed_at = job.lease_expires_at - timedelta(seconds=seconds)
        time_left = (job.deadline - claimed_at).total_seconds()
    return Lease(job_id, token, owner), job, time_left


def start_call(
    session: Session, lease: Lease, backend: str, cap: int, seconds: float = 30.0
) -> bool:
    """Take one of ``backend``'s ``cap`` call slots for this job, if one is free.

    The count is part of the conditional UPDATE; two workers can still both see a free
    slot under Postgres's READ COMMITTED, so the caller holds the backend's slot lock
    (routing.choose), which serializes slot-taking per backend.
    """
    params = {**lease_params(lease), "p_backend": backend, "p_cap": cap, "p_seconds": seconds}
    taken = session.scalar(_START_CALL, params)
    return taken is not None


def end_call(session: Session, lease: Lease) -> None:
    """Give the call slot back (fenced: a lost lease's slot is no longer this worker's)."""
    session.execute(_END_CALL, lease_params(lease))


def let_go(session: Session, lease: Lease) -> None:
    """The call has stopped on a job that ended meanwhile (cancelled): free its slot and
    lease now, not before. Nothing happens if the job is someone else's."""
    session.execute(_LET_GO, lease_params(lease))


def _pairs(leases: Sequence[Lease]) -> Any:
    return tuple_(jobs.c.id, jobs.c.lease_token).in_([(x.job_id, x.token) for x in leases])


def renew_all(session: Session, leases: Sequence[Lease], seconds: float) -> set[uuid.UUID]:
    """Extend every lease still held, in one statement; returns the jobs renewed (the
    others are lost: cancelled, re-queued by the relay, claimed by another worker)."""
    if not leases:
        return set()
    renewed = session.scalars(
        update(jobs)
        .where(_pairs(leases), jobs.c.status == JobStatus.RUNNING)
        .values(lease_expires_at=db_now(seconds))
        .returning(jobs.c.id)
    )
    return set(renewed)


def renew(session: Session, lease: Lease, seconds: float) -> bool:
    return lease.job_id in renew_all(session, [lease], seconds)


def to_stop(session: Session, leases: Sequence[Lease]) -> dict[uuid.UUID, StopReason]:
    """Which of these calls must stop now, and why: the job was cancelled, the lease is
    someone else's (or gone), or an operator retired the backend it is calling."""
    if not leases:
        return {}
    rows = session.execute(
        select(jobs.c.id, jobs.c.status, jobs.c.lease_token, _backends.c.retired)
        .select_from(jobs.outerjoin(_backends, _backends.c.name == jobs.c.calling_backend))
        .where(jobs.c.id.in_([x.job_id for x in leases]))
    )
    found = {row.id: row for row in rows}
    stops: dict[uuid.UUID, StopReason] = {}
    for lease in leases:
        row = found.get(lease.job_id)
        if row is not None and row.status == JobStatus.CANCELLED:
            stops[lease.job_id] = StopReason.CANCELLED
        elif row is None or row.lease_token != lease.token or row.status != JobStatus.RUNNING:
            stops[lease.job_id] = StopReason.LOST
        elif row.retired:
            stops[lease.job_id] = StopReason.RETIRED
    return stops
