"""Job-ended notifications: Postgres NOTIFY on a channel, sent inside the ending transaction.

NOTIFY is delivered on commit only, so a listener never hears of an end that rolled back.
Postgres folds a transaction's identical notifications into one, so once a transaction has
announced a job, announcing it again changes nothing a listener sees: each job is notified
once per transaction, the first time with its event's insert in the same statement.
"""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

from sqlalchemy import bindparam, insert, text
from sqlalchemy.orm import Session, SessionTransaction

from tierq.webhooks import record_delivery

JOB_ENDED_CHANNEL = "tierq_job_ended"
_NOTIFIED = "tierq_notified"  # session.info: (transaction, job ids it has announced)

_NOTIFY = text("SELECT pg_notify(:channel, :id)")


@cache
def _event_statements() -> tuple[Any, Any]:
    """The event insert, and the same insert with the job's NOTIFY in one statement. Built
    once: building a statement costs more Python time than running it."""
    from tierq.models import JobEvent

    table = JobEvent.__table__
    columns = table.c
    plain = insert(table).values(
        job_id=bindparam("job_id", type_=columns.job_id.type),
        kind=bindparam("kind", type_=columns.kind.type),
        detail=bindparam("detail", type_=columns.detail.type),
    )
    # A data-modifying WITH runs to completion whether or not the SELECT reads it.
    notifying = text(
        f"WITH event AS (INSERT INTO {table.name} (job_id, kind, detail) "
        "VALUES (:job_id, :kind, :detail)) SELECT pg_notify(:channel, :id)"
    ).bindparams(
        bindparam("job_id", type_=columns.job_id.type),
        bindparam("kind", type_=columns.kind.type),
        bindparam("detail", type_=columns.detail.type),
    )
    return plain, notifying


def _announced(session: Session) -> tuple[SessionTransaction, set[str]] | None:
    """This transaction (the innermost: a savepoint rolled back takes its NOTIFYs with it)
    and the job ids it has notified; None when no transaction has begun."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return None
    entry = session.info.get(_NOTIFIED)
    if entry is None or entry[0] is not transaction:
        entry = (transaction, set())
        session.info[_NOTIFIED] = entry
    return entry


def _needs_notify(session: Session, job_id: str) -> bool:
    """True (and remembered) if this transaction has not notified ``job_id`` yet."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    entry = _announced(session)
    if entry is None:
        return True
    if job_id in entry[1]:
        return False
    entry[1].add(job_id)
    return True


def notify_job_changed(session: Session, job_id: uuid.UUID | str) -> None:
    # Called on every end and parking, inside the transaction that made it: the webhook
    # outbox row is written here, so it commits (or rolls back) with the change it announces.
    record_delivery(session, job_id)
    if _needs_notify(session, str(job_id)):
        session.execute(_NOTIFY, {"channel": JOB_ENDED_CHANNEL, "id": str(job_id)})


def record_event(session: Session, job_id: uuid.UUID | str, kind: str, **detail: Any) -> None:
    """Append to the job's event log, in the caller's transaction (so never a phantom)."""
    plain, notifying = _event_statements()
    params: dict[str, Any] = {"job_id": uuid.UUID(str(job_id)), "kind": kind, "detail": detail}
    # Live watchers (SSE, long-polls) wake on every event, not only on the end.
    if _needs_notify(session, str(job_id)):
        session.execute(notifying, {**params, "channel": JOB_ENDED_CHANNEL, "id": str(job_id)})
    else:
        session.execute(plain, params)
