"""Job-ended notifications: Postgres NOTIFY on a channel, sent inside the ending transaction.

NOTIFY is delivered on commit only, so a listener never hears of an end that rolled back.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.orm import Session

from tierq.webhooks import record_delivery

JOB_ENDED_CHANNEL = "tierq_job_ended"


def notify_job_changed(session: Session, job_id: uuid.UUID | str) -> None:
    # Called on every end and parking, inside the transaction that made it: the webhook
    # outbox row is written here, so it commits (or rolls back) with the change it announces.
    record_delivery(session, job_id)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :id)"),
            {
                "channel": JOB_ENDED_CHANNEL,
                "id": str(job_id),
            },
        )


def record_event(session: Session, job_id: uuid.UUID | str, kind: str, **detail: Any) -> None:
    """Append to the job's event log, in the caller's transaction (so never a phantom)."""
    from tierq.models import JobEvent

    session.execute(
        insert(JobEvent).values(job_id=uuid.UUID(str(job_id)), kind=kind, detail=detail)
    )
    # Live watchers (SSE, long-polls) wake on every event, not only on the end.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :id)"),
            {"channel": JOB_ENDED_CHANNEL, "id": str(job_id)},
        )
