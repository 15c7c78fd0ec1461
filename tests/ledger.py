"""The promise, read from the database: N accepted, N finished, 0 lost, 0 answered twice."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select

from tierq.db import make_engine
from tierq.models import TERMINAL_STATUSES, Job, Turn


@dataclass(frozen=True)
class Ledger:
    accepted: int
    finished: int
    lost: int
    answered_twice: int
    statuses: dict[str, int]

    def __str__(self) -> str:
        return (
            f"{self.accepted} accepted, {self.finished} finished, {self.lost} lost, "
            f"{self.answered_twice} answered twice; {self.statuses}"
        )


def read(url: str, job_ids: list[str]) -> Ledger:
    ids = [uuid.UUID(j) for j in job_ids]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(
                select(Job.id, Job.status, Job.conversation_id, Job.answer_seq).where(
                    Job.id.in_(ids)
                )
            ).all()
            answers = {
                (row.conversation_id, row.seq): row.n
                for row in conn.execute(
                    select(Turn.conversation_id, Turn.seq, func.count().label("n"))
                    .where(Turn.role == "assistant")
                    .group_by(Turn.conversation_id, Turn.seq)
                )
            }
    finally:
        engine.dispose()
    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    finished = sum(1 for j in jobs if j.status in TERMINAL_STATUSES)
    return Ledger(
        accepted=len(ids),
        finished=finished,
        lost=len(ids) - finished,
        answered_twice=sum(
            1 for j in jobs if answers.get((j.conversation_id, j.answer_seq), 0) > 1
        ),
        statuses=statuses,
    )


def open_count(url: str, job_ids: list[str]) -> int:
    return read(url, job_ids).lost
