"""One thread per worker process that keeps the leases of its calls in flight and stops
the calls that must stop.

Every ``WATCH_INTERVAL`` it asks the database, in one statement for all of the process's
calls, which must stop (the job was cancelled, the lease is someone else's, an operator
retired the backend) and aborts them; every third of the lease it renews all the leases
still held, in one statement. Hundreds of calls cost two statements, not a thread each.
"""

from __future__ import annotations

import logging
import threading
import time

from tierq.db import session_scope
from tierq.leases import renew_all, to_stop
from tierq.policy import StopReason
from tierq.transitions import hand_over_owned
from worker.calls import Calls

log = logging.getLogger(__name__)
# A cancelled job's call stops within about this long (the bound is a second).
WATCH_INTERVAL = 0.4


class LeaseKeeper:
    def __init__(self, calls: Calls, lease_seconds: float, interval: float = WATCH_INTERVAL):
        self.calls, self.lease_seconds, self.interval = calls, lease_seconds, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        renew_at = time.monotonic() + self.lease_seconds / 3
        while not self._stop.wait(self.interval):
            renewing = time.monotonic() >= renew_at
            try:
                self.tick(renew=renewing)
            except Exception as exc:  # the database may be back before the leases run out
                log.warning("lease keeper: %s: %s", type(exc).__name__, exc)
                continue
            if renewing:
                renew_at = time.monotonic() + self.lease_seconds / 3

    def tick(self, renew: bool) -> None:
        """Stop what must stop; with ``renew``, extend the rest of the leases."""
        leases = self.calls.leases()
        if not leases:
            return
        with session_scope() as session:
            stops = to_stop(session, leases)
            if renew:
                kept = [x for x in leases if x.job_id not in stops]
                renewed = renew_all(session, kept, self.lease_seconds)
                stops |= {x.job_id: StopReason.LOST for x in kept if x.job_id not in renewed}
        for job_id, why in stops.items():
            if self.calls.stop(job_id, why):
                log.info("job %s: call stopped (%s)", job_id, why)


def give_back_leases(owner: str) -> int:
    """The leases ``owner`` still holds as its process exits, handed over (queued again,
    not counted as a crash): calls that could not be stopped and handed over one by one,
    e.g. while the database was away."""
    with session_scope() as session:
        return hand_over_owned(session, owner, reason=f"worker {owner} stopped")
