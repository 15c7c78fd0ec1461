"""The job's state transitions on the worker side, each one conditional and fenced.

A worker owns a job only while its lease token is on the row. Every write after the claim
checks that token, so a worker that lost its lease (it stalled, the relay re-queued the job,
another worker claimed it) can never write a second answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, Integer, and_, bindparam, exists, func, insert, select, update
from sqlalchemy.orm import Session

from tierq.db import db_now
from tierq.events import notify_job_changed, record_event
from tierq.models import ACTIVE_STATUSES, Attempt, Job, JobStatus, Turn


@dataclass(frozen=True)
class Lease:
    job_id: uuid.UUID
    token: uuid.UUID
    owner: str


# The hot statements are built once, on the table (no ORM bookkeeping), with bound
# parameters: building a statement costs more Python time than running it.
_jobs = Job.__table__
_other = _jobs.alias("other_job")


def _param(name: str, column: str) -> Any:
    return bindparam(name, type_=_jobs.c[column].type)


def in_flight(job: Any) -> Any:
    """``job`` (the Job entity, or a table's columns) is a call in flight: running under a
    lease that has not run out (database clock), so a worker that died mid-call stops
    counting when its lease expires."""
    return (
        job.calling_backend.is_not(None)
        & (job.status == JobStatus.RUNNING)
        & (job.lease_expires_at > db_now())
    )


_SECONDS = bindparam("p_seconds", type_=Float())
_IS_LEASE = and_(
    _jobs.c.id == _param("p_job", "id"),
    _jobs.c.lease_token == _param("p_token", "lease_token"),
)
_HOLDS_LEASE = and_(_IS_LEASE, _jobs.c.status == JobStatus.RUNNING)
_CLAIM_UPDATE = (
    update(_jobs)
    .where(
        _jobs.c.id == _param("p_job", "id"),
        _jobs.c.status == JobStatus.QUEUED,
        _jobs.c.tier == _param("p_tier", "tier"),
        ~exists().where(_other.c.id == _jobs.c.after_job_id, _other.c.status.in_(ACTIVE_STATUSES)),
    )
    .values(
        status=JobStatus.RUNNING,
        lease_token=_param("p_token", "lease_token"),
        lease_owner=_param("p_owner", "lease_owner"),
        lease_expires_at=db_now(_SECONDS),
        deliveries=_jobs.c.deliveries + 1,
        calling_backend=None,  # a dead worker's call is not ours
        updated_at=db_now(),
    )
)
# The claimed row itself, as the ORM's Job: the claim and the job's read in one statement.
_CLAIM_JOB = select(Job).from_statement(_CLAIM_UPDATE.returning(*_jobs.c))
_RENEW = (
    update(_jobs)
    .where(_HOLDS_LEASE)
    .values(lease_expires_at=db_now(_SECONDS))
    .returning(_jobs.c.id)
)
_COUNT_ATTEMPT = (
    update(_jobs)
    .where(_IS_LEASE)
    .values(attempts=_jobs.c.attempts + 1, tier_attempts=_jobs.c.tier_attempts + 1)
)
_START_CALL = (
    update(_jobs)
    .where(
        _HOLDS_LEASE,
        select(func.count())
        .where(
            in_flight(_other.c),
            _other.c.calling_backend == _param("p_backend", "calling_backend"),
            _other.c.id != _param("p_job", "id"),
        )
        .scalar_subquery()
        < bindparam("p_cap", type_=Integer()),
    )
    .values(calling_backend=_param("p_backend", "calling_backend"))
    .returning(_jobs.c.id)
)
_END_CALL = update(_jobs).where(_HOLDS_LEASE).values(calling_backend=None)
_SUCCEED = (
    update(_jobs)
    .where(_HOLDS_LEASE)
    .values(
        status=JobStatus.SUCCEEDED,
        result=_param("p_result", "result"),
        backend=_param("p_backend", "backend"),
        model=_param("p_model", "model"),
        quality=_param("p_quality", "quality"),
        cache_key=_param("p_cache_key", "cache_key"),
        finished_at=db_now(),
        error=None,
        lease_token=None,
        lease_owner=None,
        lease_expires_at=None,
        calling_backend=None,
        updated_at=db_now(),
        # The answer's own attempt is counted by its release (see succeed).
        attempts=_jobs.c.attempts + 1,
        tier_attempts=_jobs.c.tier_attempts + 1,
    )
    .returning(_jobs.c.id)
)
_SUCCESSORS = (
    update(_jobs)
    .where(_jobs.c.after_job_id == _param("p_job", "id"), _jobs.c.status == JobStatus.QUEUED)
    .values(published_at=db_now())
    .returning(_jobs.c.id, _jobs.c.tier)
)
_ATTEMPT_INSERT = insert(Attempt.__table__)
_TURN_INSERT = insert(Turn.__table__)


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"p_job": lease.job_id, "p_token": lease.token}


def _claim_params(
    job_id: uuid.UUID, tier: str, owner: str, seconds: float, token: uuid.UUID
) -> dict[str, Any]:
    return {
        "p_job": job_id,
        "p_tier": tier,
        "p_token": token,
        "p_owner": owner,
        "p_seconds": seconds,
    }


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
    (``seconds_left``'s answer at the claim), read by the claim's own statement."""
    token = uuid.uuid4()
    job = session.scalars(
        _CLAIM_JOB, _claim_params(job_id, tier, owner, seconds, token)
    ).one_or_none()
    if job is None:
        return None
    record_event(session, job_id, "claimed", worker=owner, tier=tier)
    time_left = None
    if job.deadline is not None and job.lease_expires_at is not None:
        # The lease runs ``seconds`` from the claim's database time.
        claimed_at = as_aware(job.lease_expires_at) - timedelta(seconds=seconds)
        time_left = (as_aware(job.deadline) - claimed_at).total_seconds()
    return Lease(job_id, token, owner), job, time_left


def preparation_failed(session: Session, job_id: uuid.UUID, limit: int, error: str) -> bool:
    """The claim rolled back with a call preparation that raised, so no lease is left to
    run out and the relay would republish the job forever. Count it as a lost lease (dead at
    ``limit``, like a worker that dies on the job every time) and have the relay publish it
    again at once. True if the job is now dead."""
    lost = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(lost_leases=Job.lost_leases + 1, published_at=None, updated_at=db_now())
        .returning(Job.lost_leases)
    )
    if lost is None:
        return False
    if lost < limit:
        record_event(session, job_id, "requeued", reason=f"preparing the call failed: {error}")
        return False
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.DEAD,
            finished_at=db_now(),
            error=f"poison job: preparing its call failed {limit} times; last: {error}",
        )
    )
    record_event(session, job_id, "dead", reason="poison job")
    notify_job_changed(session, job_id)
    return True


def renew(session: Session, lease: Lease, seconds: float) -> bool:
    renewed = session.scalar(_RENEW, {**_lease_params(lease), "p_seconds": seconds})
    return renewed is not None


def _fenced(lease: Lease) -> Any:
    return update(Job).where(
        Job.id == lease.job_id, Job.lease_token == lease.token, Job.status == JobStatus.RUNNING
    )


def _release(session: Session, lease: Lease, **values: Any) -> bool:
    """Apply ``values`` and give up the lease, if we still hold it."""
    done = session.scalar(
        _fenced(lease)
        .values(
            lease_token=None,
            lease_owner=None,
            lease_expires_at=None,
            calling_backend=None,
            updated_at=db_now(),
            **values,
        )
        .returning(Job.id)
    )
    return done is not None


def start_call(session: Session, lease: Lease, backend: str, cap: int) -> bool:
    """Take one of ``backend``'s ``cap`` call slots for this job, if one is free.

    The count is part of the conditional UPDATE; two workers can still both see a free
    slot under Postgres's READ COMMITTED, so the caller holds the backend's row lock
    (routing.choose), which serializes slot-taking per backend.
    """
    taken = session.scalar(
        _START_CALL, {**_lease_params(lease), "p_backend": backend, "p_cap": cap}
    )
    return taken is not None


def end_call(session: Session, lease: Lease) -> None:
    """Give the call slot back (fenced: a lost lease's slot is no longer this worker's)."""
    session.execute(_END_CALL, _lease_params(lease))


def add_attempt(session: Session, lease: Lease, **fields: Any) -> None:
    """The attempt row alone (the call happened, whoever holds the lease now)."""
    # Core, not the unit of work: nothing reads the row back in this transaction.
    session.execute(_ATTEMPT_INSERT, {"job_id": lease.job_id, "worker": lease.owner, **fields})


def record_attempt(session: Session, lease: Lease, **fields: Any) -> None:
    """The attempt row always (the call happened); the job's counters only while the lease
    is ours, or a worker that lost the job would use up its next owner's tries."""
    add_attempt(session, lease, **fields)
    _count_attempt(session, lease)


def _count_attempt(session: Session, lease: Lease) -> None:
    session.execute(_COUNT_ATTEMPT, _lease_params(lease))


def succeed(
    session: Session,
    lease: Lease,
    job: Job,
    result: dict[str, Any],
    *,
    backend: str,
    model: str,
    quality: str,
    cache_key: str | None = None,
    count_attempt: bool = False,
) -> bool:
    """running → succeeded, with the assistant turn, in the caller's transaction.

    ``count_attempt``: the answer's own attempt (its row written by ``add_attempt``) is
    counted here, and its call slot given back, by the release itself; one statement
    instead of three while the lease is ours.
    """
    answer = {"result": result, "backend": backend, "model": model, "quality": quality}
    answer["cache_key"] = cache_key
    if count_attempt:
        released = session.scalar(
            _SUCCEED, {**_lease_params(lease), **{f"p_{k}": v for k, v in answer.items()}}
        )
        if released is None:  # what record_attempt would have done; the slot is not ours
            _count_attempt(session, lease)
            return False
    elif not _release(
        session, lease, status=JobStatus.SUCCEEDED, finished_at=db_now(), error=None, **answer
    ):
        return False
    record_event(
        session,
        job.id,
        "answered",
        backend=backend,
        quality=quality,
        tier=result.get("tierq", {}).get("tier"),
    )
    content = result["choices"][0]["message"]["content"]
    session.execute(
        _TURN_INSERT,
        {
            "conversation_id": job.conversation_id,
            "seq": job.answer_seq,
            "role": "assistant",
            "content": content,
            "job_id": job.id,
        },
    )
    notify_job_changed(session, job.id)
    return True


def end(session: Session, lease: Lease, status: JobStatus, reason: str, **values: Any) -> bool:
    """running → failed / dead / parked, with a reason the client can read."""
    ended = _release(
        session,
        lease,
        status=status,
        error=reason,
        finished_at=db_now() if status.terminal else None,
        **values,
    )
    if ended:
        record_event(session, lease.job_id, str(status), reason=reason)
        notify_job_changed(session, lease.job_id)
    return ended


def retry_later(session: Session, lease: Lease, delay: float, reason: str) -> bool:
    """running → retry_wait; the relay makes it queued again when due (database clock)."""
    done = _release(session, lease, status=JobStatus.RETRY_WAIT, due_at=db_now(delay))
    if done:
        record_event(
            session, lease.job_id, "retrying", delay_seconds=round(delay, 3), reason=reason
        )
    return done


def escalate(
    session: Session,
    lease: Lease,
    from_tier: str,
    tier: str,
    reason: str,
    pinned: str | None = None,
) -> bool:
    """running → queued on another tier; the caller publishes after commit."""
    done = _release(
        session,
        lease,
        status=JobStatus.QUEUED,
        tier=tier,
        tier_attempts=0,
        published_at=db_now(),
        pinned_backend=pinned,
    )
    if done:
        record_event(
            session,
            lease.job_id,
            "escalated",
            reason=reason,
            pinned=pinned,
            **{"from": from_tier, "to": tier},
        )
    return done


def deadline_within(session: Session, job_id: uuid.UUID, seconds: float) -> bool:
    """Will the job's deadline have passed ``seconds`` from now (database clock)?"""
    return bool(
        session.scalar(
            select(Job.deadline.is_not(None) & (Job.deadline < db_now(seconds))).where(
                Job.id == job_id
            )
        )
    )


def seconds_left(session: Session, job_id: uuid.UUID) -> float | None:
    """Seconds until the job's deadline by the database clock (negative: passed); None if
    it has none."""
    deadline, now = session.execute(select(Job.deadline, db_now()).where(Job.id == job_id)).one()
    if deadline is None:
        return None
    return (as_aware(deadline) - as_aware(now)).total_seconds()


def as_aware(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite hands back db_now() as text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def deadline_passed(session: Session, job_id: uuid.UUID) -> bool:
    return bool(
        session.scalar(
            select(Job.deadline.is_not(None) & (Job.deadline < db_now())).where(Job.id == job_id)
        )
    )


def successors(session: Session, job_id: uuid.UUID) -> list[tuple[uuid.UUID, str]]:
    """Queued jobs that were waiting for this one; mark them published (the caller does)."""
    rows = session.execute(_SUCCESSORS, {"p_job": job_id})
    return [(row.id, row.tier) for row in rows]
