"""The outbox publisher: the relay's one way of turning rows that need a broker message into
messages, for jobs and webhook deliveries alike.

A row needs a message while it is waiting (a queued job, a due delivery). Each sweep:
- rows never published (``published_at`` NULL) are published, in the outbox's order;
- of those published long ago, as many per queue as the broker's queue is short of are
  published again (oldest publication first): a message may have been lost (Redis restarted
  empty), and republishing every stale row instead would add the whole backlog to the queue
  each period while the workers drain it. A reserved-but-unclaimed message is not in the
  queue, so at most one per worker thread is published twice; the second is a no-op claim.
Publishing stops at the first failure: with the broker down every publish waits out its
retries, and the relay must get back to its other steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, update
from sqlalchemy.orm import Session

from tierq import broker
from tierq.db import db_now, session_scope
from tierq.settings import Settings

PUBLISH_BATCH = 1000


@dataclass(frozen=True)
class Outbox:
    """Rows of ``table`` (an ORM entity with ``id`` and ``published_at``) that ``waiting``
    selects each need one message of ``task`` on a queue: the row's ``queue_column``
    (a job's tier), or the one queue ``queue_name`` (webhook deliveries)."""

    table: Any
    task: str
    kind: str  # what a row is, in logs: job, webhook
    waiting: Callable[[], ColumnElement[bool]]
    order: Callable[[], list[Any]]
    republish_after: Callable[[], float]
    queue_column: Callable[[], Any] | None = None
    queue_name: str = ""

    def queue(self) -> Any:
        column = self.queue_column
        return column() if column is not None else literal(self.queue_name)

    def expected(self, session: Session, where: ColumnElement[bool]) -> dict[str, int]:
        """How many rows matching ``where`` each queue should hold a message for."""
        if self.queue_column is None:
            count = session.scalar(select(func.count()).where(where)) or 0
            return {self.queue_name: count} if count else {}
        column = self.queue_column()
        counted = select(column, func.count()).where(where).group_by(column)
        return dict(session.execute(counted).all())  # type: ignore[arg-type]


def publish_pending(outbox: Outbox, settings: Settings) -> int:
    """One sweep of ``outbox``; returns how many messages it published."""
    table = outbox.table
    queue = outbox.queue().label("queue")
    with session_scope() as session:
        rows = session.execute(
            select(table.id, queue)
            .where(outbox.waiting(), table.published_at.is_(None))
            .order_by(*outbox.order())
            .limit(PUBLISH_BATCH)
        ).all()
        rows += _missing_messages(session, outbox, settings, PUBLISH_BATCH - len(rows))
    published = _publish_until_failure(outbox, rows)
    if published:
        with session_scope() as session:
            session.execute(
                update(table).where(table.id.in_(published)).values(published_at=db_now())
            )
    return len(published)


def _missing_messages(
    session: Session, outbox: Outbox, settings: Settings, limit: int
) -> list[Any]:
    """Rows published long ago whose message may be gone, as many per queue as the broker's
    queue is short of the rows that should have one."""
    table = outbox.table
    queue = outbox.queue()
    published = outbox.waiting() & table.published_at.is_not(None)
    expected = outbox.expected(session, published)
    depths = broker.queue_depths(settings, list(expected)) if expected else {}
    if depths is None or limit <= 0:
        return []
    stale = table.published_at < db_now(-outbox.republish_after())
    rows: list[Any] = []
    for name, count in expected.items():
        shortfall = min(count - depths.get(name, 0), limit - len(rows))
        if shortfall > 0:
            rows += session.execute(
                select(table.id, queue.label("queue"))
                .where(published, stale, *([] if outbox.queue_column is None else [queue == name]))
                .order_by(table.published_at)
                .limit(shortfall)
            ).all()
    return rows


def _publish_until_failure(outbox: Outbox, rows: list[Any]) -> list[Any]:
    published = []
    for row in rows:
        retry = broker.RELAY_RETRY
        if not broker.send(outbox.task, row.id, row.queue, retry_policy=retry, kind=outbox.kind):
            break
        published.append(row.id)
    return published
