"""Keeps a lease alive while a long backend call runs, from a thread beside the call."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tierq.db import session_scope
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
