"""Keeps a lease alive while a long backend call runs, from a thread beside the call; and
gives a stopped worker's leases back, so its jobs need not wait for them to run out."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import update

from tierq.db import db_now, session_scope
from tierq.events import record_event
from tierq.models import Job, JobStatus
from worker.claim import Lease, renew

log = logging.getLogger(__name__)


@contextmanager
def kept_alive(lease: Lease, seconds: float) -> Iterator[threading.Event]:
    """Renew ``lease`` every third of its length; the yielded event is set if it was lost."""
    stop, lost = threading.Event(), threading.Event()

    def renew_until_stopped() -> None:
        while not stop.wait(seconds / 3):
            try:
                with session_scope() as session:
                    if not renew(session, lease, seconds):
                        lost.set()
                        return
            except Exception as exc:  # the database may be back before the lease runs out
                log.warning("lease renewal for job %s failed: %s", lease.job_id, exc)

    thread = threading.Thread(target=renew_until_stopped, name="lease-keeper", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def give_back_leases(worker_node: str) -> int:
    """running → queued for every job whose lease a pool process of ``worker_node`` holds.

    Called as the worker's main process exits, after its pool is gone: a call the soft
    shutdown had to cut off would otherwise keep its lease, the message the shutdown
    requeued would be dropped as a duplicate, and the job would wait for the lease to run
    out. published_at NULL has the relay publish it at its next sweep. A lease lost this
    way is not counted as a crash: the worker was stopped, it did not die on the job.
    """
    with session_scope() as session:
        released = session.scalars(
            update(Job)
            .where(Job.status == JobStatus.RUNNING, Job.lease_owner.startswith(f"{worker_node}:"))
            .values(
                status=JobStatus.QUEUED,
                lease_token=None,
                lease_owner=None,
                lease_expires_at=None,
                calling_backend=None,
                published_at=None,
                updated_at=db_now(),
            )
            .returning(Job.id)
        ).all()
        for job_id in released:
            record_event(session, job_id, "requeued", reason=f"worker {worker_node} stopped")
    return len(released)
