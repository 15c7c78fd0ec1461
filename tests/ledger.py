"""The promise, read from the database: N accepted, N finished, 0 lost, 0 answered twice."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from tierq.db import make_engine
from tierq.models import TERMINAL_STATUSES, Job, JobStatus, Turn


@dataclass(frozen=True)
class Ledger:
    accepted: int
    finished: int
    lost: int
    answered_twice: int
    statuses: dict[str, int]
    # Jobs whose stored answer disagrees with the conversation: a succeeded job whose
    # result is not its one assistant turn, or a job that did not succeed yet has one.
    mismatched: int = 0

    def __str__(self) -> str:
        return (
            f"{self.accepted} accepted, {self.finished} finished, {self.lost} lost, "
            f"{self.answered_twice} answered twice, {self.mismatched} mismatched answers; "
            f"{self.statuses}"
        )


def read(url: str, job_ids: list[str]) -> Ledger:
    ids = [uuid.UUID(j) for j in job_ids]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(select(Job.id, Job.status, Job.result).where(Job.id.in_(ids))).all()
            answers = _answer_turns(conn, ids)
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
        answered_twice=sum(1 for j in jobs if len(answers.get(j.id, [])) > 1),
        statuses=statuses,
        mismatched=sum(
            1 for j in jobs if not _answer_matches(j.status, j.result, answers.get(j.id, []))
        ),
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


def _answer_matches(status: str, result: dict[str, Any] | None, turns: list[str]) -> bool:
    if status != JobStatus.SUCCEEDED:
        return not turns
    if result is None or len(turns) != 1:
        return False
    return bool(result["choices"][0]["message"]["content"] == turns[0])


def open_count(url: str, job_ids: list[str]) -> int:
    return read(url, job_ids).lost
