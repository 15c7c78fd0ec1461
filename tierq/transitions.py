"""Every change of a job's status, by name: the only writer of ``jobs.status``.

Each transition is one conditional statement (or one transaction with its event and the
wake-up of its waiters), so two processes racing for the same change make it once:
- the worker's, fenced by its lease (``tierq.leases``): succeed, retry_later, escalate,
  park, fail, hand_over;
- the client's and the operator's: cancel, release_parked (replay);
- the relay's: requeue_expired (a lost lease), wake_due, fail_past_deadline, and
  preparation_failed (a call preparation that raised).

DESIGN.md's job lifecycle is this module's map.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from tierq.db import db_now, db_random
from tierq.events import notify_job_changed, record_event
from tierq.leases import HOLDS_LEASE, IS_LEASE, Lease, jobs, lease_params, param
from tierq.messages import turn_values
from tierq.models import ACTIVE_STATUSES, Attempt, Job, JobStatus, Turn

_RELEASED = {
    "lease_token": None,
    "lease_owner": None,
    "lease_expires_at": None,
    "calling_backend": None,
}
_COUNT_ATTEMPT = (
    update(jobs)
    .where(IS_LEASE)
    .values(attempts=jobs.c.attempts + 1, tier_attempts=jobs.c.tier_attempts + 1)
)
_SUCCEED = (
    update(jobs)
    .where(HOLDS_LEASE)
    .values(
        status=JobStatus.SUCCEEDED,
        result=param("p_result", "result"),
        backend=param("p_backend", "backend"),
        model=param("p_model", "model"),
        quality=param("p_quality", "quality"),
        cache_key=param("p_cache_key", "cache_key"),
        finished_at=db_now(),
        error=None,
        updated_at=db_now(),
        # The answer's own attempt is counted by its release (see succeed).
        attempts=jobs.c.attempts + param("p_counted", "attempts"),
        tier_attempts=jobs.c.tier_attempts + param("p_counted", "attempts"),
        **_RELEASED,
    )
    .returning(jobs.c.id)
)
_SUCCESSORS = (
    update(jobs)
    .where(jobs.c.after_job_id == param("p_job", "id"), jobs.c.status == JobStatus.QUEUED)
    .values(published_at=db_now())
    .returning(jobs.c.id, jobs.c.tier)
)
_ATTEMPT_INSERT = insert(Attempt.__table__)
_TURN_INSERT = insert(Turn.__table__)


# -- the worker's, fenced by its lease ----------------------------------------------------


def add_attempt(session: Session, lease: Lease, **fields: Any) -> None:
    """The attempt row alone (the call happened, whoever holds the lease now)."""
    session.execute(_ATTEMPT_INSERT, {"job_id": lease.job_id, "worker": lease.owner, **fields})


def record_attempt(session: Session, lease: Lease, **fields: Any) -> None:
    """The attempt row always; the job's counters only while the lease is ours, or a worker
    that lost the job would use up its next owner's tries."""
    add_attempt(session, lease, **fields)
    session.execute(_COUNT_ATTEMPT, lease_params(lease))


def _release(session: Session, lease: Lease, **values: Any) -> bool:
    """Apply ``values`` and give up the lease and call slot, if we still hold the lease."""
    done = session.scalar(
        update(jobs)
        .where(HOLDS_LEASE)
        .values(updated_at=db_now(), **_RELEASED, **values)
        .returning(jobs.c.id),
        lease_params(lease),
    )
    return done is not None


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
    counted by the release itself; one statement instead of two while the lease is ours.
    """
    answer = {"result": result, "backend": backend, "model": model, "quality": quality}
    params = {f"p_{k}": v for k, v in answer.items()} | {"p_cache_key": cache_key}
    released = session.scalar(
        _SUCCEED, {**lease_params(lease), **params, "p_counted": int(count_attempt)}
    )
    if released is None:
        if count_attempt:  # the job is someone else's now: its counters are not ours
            session.execute(_COUNT_ATTEMPT, lease_params(lease))
        return False
    record_event(
        session, job.id, "answered", backend=backend, quality=quality,
        tier=result.get("tierq", {}).get("tier"),
    )  # fmt: skip
    session.execute(
        _TURN_INSERT,
        {
            "conversation_id": job.conversation_id,
            "seq": job.answer_seq,
            **turn_values(result["choices"][0]["message"]),
            "job_id": job.id,
        },
    )
    notify_job_changed(session, job.id)
    return True


def successors(session: Session, job_id: uuid.UUID) -> list[tuple[uuid.UUID, str]]:
    """Queued jobs that were waiting for this one; marked published (the caller publishes)."""
    return [(row.id, row.tier) for row in session.execute(_SUCCESSORS, {"p_job": job_id})]


def _end(session: Session, lease: Lease, status: JobStatus, reason: str, **values: Any) -> bool:
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


def fail(session: Session, lease: Lease, reason: str) -> bool:
    """running → failed, with a reason the client can read."""
    return _end(session, lease, JobStatus.FAILED, reason)


def park(session: Session, lease: Lease, reason: str, first_tier: str, retry_after: float) -> bool:
    """running → parked: the emergency queue; replayed on the first tier once one is alive."""
    return _end(
        session,
        lease,
        JobStatus.PARKED,
        reason,
        tier=first_tier,
        tier_attempts=0,
        pinned_backend=None,
        due_at=db_now(retry_after),
    )


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
    """running → queued on ``tier`` (another, or the same one to reroute); the caller
    publishes after commit."""
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
            session, lease.job_id, "escalated", reason=reason, pinned=pinned,
            **{"from": from_tier, "to": tier},
        )  # fmt: skip
    return done


def hand_over(session: Session, lease: Lease, reason: str) -> bool:
    """running → queued, not counted as a crash: the worker is stopping, the job did not
    kill it. published_at NULL has the relay publish it at its next sweep."""
    done = _release(session, lease, status=JobStatus.QUEUED, published_at=None)
    if done:
        record_event(session, lease.job_id, "requeued", reason=reason)
    return done


def hand_over_owned(session: Session, owner: str, reason: str) -> int:
    """``hand_over`` for every lease ``owner`` (one worker, by its unique name) still holds:
    the fallback as a worker exits, for calls it could not stop and hand over itself."""
    released = session.scalars(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.lease_owner == owner)
        .values(status=JobStatus.QUEUED, published_at=None, updated_at=db_now(), **_RELEASED)
        .returning(Job.id)
    ).all()
    for job_id in released:
        record_event(session, job_id, "requeued", reason=reason)
    return len(released)


# -- the client's and the operator's ------------------------------------------------------


def cancel(session: Session, job_id: uuid.UUID, owner_id: uuid.UUID, reason: str) -> bool:
    """Any active state → cancelled. A running job keeps its lease and call slot: its
    worker sees the cancel within a second, aborts the call and only then frees the slot
    (``leases.let_go``), so the backend never has more calls than its cap."""
    cancelled = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES))
        .values(status=JobStatus.CANCELLED, error=reason, finished_at=db_now(), updated_at=db_now())
        .returning(Job.id)
    )
    if cancelled:
        record_event(session, job_id, "cancelled", reason=reason)
        notify_job_changed(session, job_id)
    return cancelled is not None


def release_parked(
    session: Session, ids: list[uuid.UUID], tier: str | None, by: str
) -> list[uuid.UUID]:
    """parked → queued on ``tier`` (None: the tier each was parked on); the relay publishes
    them. The one way out of parking."""
    if not ids:
        return []
    released = session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.PARKED)
        .values(
            status=JobStatus.QUEUED,
            tier=tier if tier is not None else Job.tier,
            published_at=None,
            due_at=None,
            updated_at=db_now(),
        )
        .returning(Job.id, Job.tier)
    ).all()
    for job_id, queued_on in released:
        record_event(session, job_id, "replayed", tier=queued_on, by=by)
    return [job_id for job_id, _ in released]


# -- the relay's ---------------------------------------------------------------------------


def requeue_expired(
    session: Session, limit: int, stagger: float = 0.0
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Running jobs whose lease ran out: their worker died (or stalled past it). Counted on
    the job; at ``limit`` it is a poison job and dead. Returns (dead, requeued).

    A worker process runs many calls: when one job kills it, its neighbours' leases run out
    with the culprit's, all at once. Each waits a random part of ``stagger`` seconds
    (retry_wait) before it runs again, so they are not claimed again together with the
    culprit, to die beside it until they too look like poison jobs."""
    expired = (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < db_now())
    lost = {"lost_leases": Job.lost_leases + 1, "updated_at": db_now(), **_RELEASED}
    dead = session.scalars(
        update(Job)
        .where(expired, Job.lost_leases + 1 >= limit)
        .values(
            status=JobStatus.DEAD,
            finished_at=db_now(),
            error=f"poison job: its worker died {limit} times before it finished",
            **lost,
        )
        .returning(Job.id)
    ).all()
    for job_id in dead:
        record_event(session, job_id, "dead", reason="poison job")
        notify_job_changed(session, job_id)
    again = {"status": JobStatus.QUEUED, "published_at": None}
    if stagger > 0:
        again = {"status": JobStatus.RETRY_WAIT, "due_at": db_now(db_random() * stagger)}
    requeued = session.scalars(
        update(Job).where(expired).values(**again, **lost).returning(Job.id)
    ).all()
    for job_id in requeued:
        record_event(session, job_id, "requeued", reason="lease expired")
    return list(dead), list(requeued)


def wake_due(session: Session) -> int:
    """retry_wait → queued once due (database clock); the relay publishes them."""
    woken = session.scalars(
        update(Job)
        .where(Job.status == JobStatus.RETRY_WAIT, Job.due_at <= db_now())
        .values(status=JobStatus.QUEUED, published_at=None, due_at=None, updated_at=db_now())
        .returning(Job.id)
    ).all()
    return len(woken)


def fail_past_deadline(session: Session) -> int:
    """Waiting jobs (queued, retry_wait, parked) whose deadline passed → failed."""
    waiting = (JobStatus.QUEUED, JobStatus.RETRY_WAIT, JobStatus.PARKED)
    failed = session.scalars(
        update(Job)
        .where(Job.status.in_(waiting), Job.deadline < db_now())
        .values(
            status=JobStatus.FAILED,
            error="deadline passed before an answer",
            finished_at=db_now(),
            updated_at=db_now(),
        )
        .returning(Job.id)
    ).all()
    for job_id in failed:
        record_event(session, job_id, "failed", reason="deadline passed")
        notify_job_changed(session, job_id)
    return len(failed)


def preparation_failed(
    session: Session, job_id: uuid.UUID, limit: int, error: str, fatal: bool = False
) -> bool:
    """The claim rolled back with a call preparation that raised, so no lease is left to
    run out and the relay would republish the job forever. A failure of the request's own
    (``fatal``: not the database's) fails the job at once: trying again fails again. Any
    other counts as a lost lease (dead at ``limit``, like a worker that dies on the job every
    time) and the relay publishes it again at once. True if the job has ended."""
    if fatal:
        return _fail_queued(session, job_id, f"tierq could not prepare the call: {error}")
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


def _fail_queued(session: Session, job_id: uuid.UUID, reason: str) -> bool:
    failed = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.FAILED, finished_at=db_now(), updated_at=db_now(), error=reason)
        .returning(Job.id)
    )
    if failed is None:
        return False
    record_event(session, job_id, str(JobStatus.FAILED), reason=reason)
    notify_job_changed(session, job_id)
    return True


def seconds_left(session: Session, job_id: uuid.UUID) -> float | None:
    """Seconds until the job's deadline by the database clock (negative: passed); None if
    it has none."""
    deadline, now = session.execute(select(Job.deadline, db_now()).where(Job.id == job_id)).one()
    return None if deadline is None else (deadline - now).total_seconds()
