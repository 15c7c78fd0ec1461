"""The promise, read from the database: N accepted, N finished, 0 lost, 0 answered twice.

"Answered twice" is counted from three records, each of which a second answer would leave:

- the assistant turns written for the job (their unique constraint on the conversation's
  position makes a second turn at the *same* position impossible, so this count alone can
  hardly fail; a turn at another position would still show);
- the job's ``answered`` events: ``transitions.succeed`` records one in the transaction that
  ends the job, so two of them are two answers committed;
- the job's ``ok`` attempts: one row per backend call that answered. At-least-once
  execution makes more than one legitimate: a worker whose lease ran out (it stalled, or
  the database was away) or was handed back may still get the backend's answer, writes its
  ``ok`` attempt (the outage record, unfenced) and has its answer refused by the lease
  fence. Each such refused answer belongs to a lease that ended without an answer, and
  every such lease leaves a ``requeued`` event (the relay's "lease expired", a worker's
  "worker ... stopped"). So a job may have at most 1 + (its ``requeued`` events) ``ok``
  attempts; one more than that is a backend answer no lost lease explains: counted as
  answered twice.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from tierq.db import make_engine
from tierq.models import TERMINAL_STATUSES, Attempt, Job, JobEvent, JobStatus, Turn


@dataclass(frozen=True, repr=False)
class Ledger:
    accepted: int
    finished: int
    lost: int
    answered_twice: int
    statuses: dict[str, int]
    # Jobs whose stored answer disagrees with the conversation: a succeeded job whose
    # result is not its one assistant turn, or a job that did not succeed yet has one.
    mismatched: int = 0
    # Per job (only jobs with at least one): `answered` events, `ok` attempts, `requeued`
    # events (leases that ended without an answer: lost, or handed back).
    answered_events: dict[str, int] = field(default_factory=dict)
    ok_attempts: dict[str, int] = field(default_factory=dict)
    requeues: dict[str, int] = field(default_factory=dict)
    twice: tuple[str, ...] = ()  # the jobs answered twice

    @property
    def rerun(self) -> int:
        """Jobs the backend answered more than once. Within 1 + requeues ``ok`` attempts
        the extra answers were refused by the fence after a lost or handed-back lease:
        at-least-once execution, not a violation (``answered_twice`` counts the rest)."""
        return sum(1 for n in self.ok_attempts.values() if n > 1)

    def __str__(self) -> str:
        return (
            f"{self.accepted} accepted, {self.finished} finished, {self.lost} lost, "
            f"{self.answered_twice} answered twice, {self.mismatched} mismatched answers; "
            f"{self.statuses}; {self.rerun} run again after a lost lease"
            + (f"; answered twice: {', '.join(self.twice)}" if self.twice else "")
        )

    __repr__ = __str__  # what a failed assertion prints: the counts, not every job


def read(url: str, job_ids: list[str]) -> Ledger:
    ids = [uuid.UUID(j) for j in job_ids]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(select(Job.id, Job.status, Job.result).where(Job.id.in_(ids))).all()
            answers = _answer_turns(conn, ids)
            answered = _event_counts(conn, ids, "answered")
            requeues = _event_counts(conn, ids, "requeued")
            ok = _ok_attempts(conn, ids)
    finally:
        engine.dispose()
    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    finished = sum(1 for j in jobs if j.status in TERMINAL_STATUSES)
    twice = {
        j.id
        for j in jobs
        if len(answers.get(j.id, [])) > 1 or answered[j.id] > 1 or ok[j.id] > 1 + requeues[j.id]
    }
    return Ledger(
        accepted=len(ids),
        finished=finished,
        lost=len(ids) - finished,
        answered_twice=len(twice),
        statuses=statuses,
        mismatched=sum(
            1 for j in jobs if not _answer_matches(j.status, j.result, answers.get(j.id, []))
        ),
        answered_events={str(k): n for k, n in answered.items()},
        ok_attempts={str(k): n for k, n in ok.items()},
        requeues={str(k): n for k, n in requeues.items()},
        twice=tuple(sorted(str(j) for j in twice)),
    )


def _answer_turns(conn: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """Every assistant turn written for each job, by the turn's own job_id: a second
    answer would show here even if it landed at another position of the conversation."""
    answers: dict[uuid.UUID, list[str]] = {}
    rows = conn.execute(
        select(Turn.job_id, Turn.content).where(Turn.role == "assistant", Turn.job_id.in_(ids))
    )
    for row in rows:
        answers.setdefault(row.job_id, []).append(row.content)
    return answers


def _event_counts(conn: Any, ids: list[uuid.UUID], kind: str) -> Counter[uuid.UUID]:
    rows = conn.execute(
        select(JobEvent.job_id, func.count().label("n"))
        .where(JobEvent.kind == kind, JobEvent.job_id.in_(ids))
        .group_by(JobEvent.job_id)
    )
    return Counter({row.job_id: int(row.n) for row in rows})


def _ok_attempts(conn: Any, ids: list[uuid.UUID]) -> Counter[uuid.UUID]:
    rows = conn.execute(
        select(Attempt.job_id, func.count().label("n"))
        .where(Attempt.outcome == "ok", Attempt.job_id.in_(ids))
        .group_by(Attempt.job_id)
    )
    return Counter({row.job_id: int(row.n) for row in rows})


def _answer_matches(status: str, result: dict[str, Any] | None, turns: list[str]) -> bool:
    if status != JobStatus.SUCCEEDED:
        return not turns
    if result is None or len(turns) != 1:
        return False
    return bool(result["choices"][0]["message"]["content"] == turns[0])


def open_count(url: str, job_ids: list[str]) -> int:
    """Jobs not ended yet: one count, cheap enough to poll."""
    ids = [uuid.UUID(j) for j in job_ids]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ended = conn.scalar(
                select(func.count()).where(Job.id.in_(ids), Job.status.in_(TERMINAL_STATUSES))
            )
    finally:
        engine.dispose()
    return len(ids) - int(ended or 0)
