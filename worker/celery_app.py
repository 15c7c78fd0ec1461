"""The worker's Celery application: tierq's shared transport config plus the task."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.signals import celeryd_init, worker_process_init, worker_shutting_down

from tierq.broker import RUN_JOB, get_celery
from tierq.config import load_config
from tierq.db import get_engine
from tierq.policy import StopReason
from tierq.settings import get_settings
from worker.calls import Calls
from worker.lease_keeper import LeaseKeeper, give_back_leases
from worker.runner import JobRunner
from worker.webhook_delivery import deliver_webhook  # noqa: F401 - registers the task

log = logging.getLogger(__name__)
app = get_celery()
# Calls still in flight this long before the soft shutdown ends are stopped and handed over.
HAND_OVER_MARGIN = 2.0


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool child (a prefork pool) must not share its parent's database sockets.
    get_engine().dispose(close=False)


@dataclass
class _Process:
    """The worker process's one runner, call loop and lease keeper, made on first use."""

    runner: JobRunner | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_process = _Process()


def _runner(worker_node: str) -> JobRunner:
    with _process.lock:
        if _process.runner is None:
            settings = get_settings()
            calls = Calls()
            LeaseKeeper(calls, settings.lease_seconds).start()
            # The lease owner names this worker (its unique node name) and process.
            owner = f"{worker_node}:{os.getpid()}"
            _process.runner = JobRunner(load_config(settings.config), settings, owner, calls)
        return _process.runner


@worker_shutting_down.connect
def _hand_over_at_shutdown(**_: Any) -> None:
    """SIGTERM (Celery's warm shutdown, which waits for running tasks): calls may finish
    for ``worker_soft_shutdown_timeout`` minus a margin; then the calls still in flight are
    stopped and each job's thread hands its job back to the queue (its own lease only), so
    the worker exits soon and no job waits for a lease to run out."""
    runner = _process.runner
    if runner is None:
        return
    grace = max(app.conf.worker_soft_shutdown_timeout - HAND_OVER_MARGIN, 0.0)
    timer = threading.Timer(grace, runner.calls.stop_all, args=(StopReason.SHUTDOWN,))
    timer.daemon = True
    timer.start()


@celeryd_init.connect
def _give_leases_back_at_exit(sender: str, **_: Any) -> None:
    # The fallback for calls that could not hand themselves over (the database was away):
    # atexit runs as the main process ends; forked pool children leave through os._exit.
    main_pid = os.getpid()

    def give_back() -> None:
        runner = _process.runner
        if os.getpid() != main_pid or runner is None:
            return
        try:
            if released := give_back_leases(runner.worker):
                log.warning("gave back the leases of %d interrupted job(s)", released)
        except Exception as exc:  # the database may be down: the leases run out instead
            log.warning("could not give back leases at exit: %s", type(exc).__name__)

    atexit.register(give_back)


@app.task(name=RUN_JOB, bind=True, acks_late=True, ignore_result=True)
def run_job(self: Task, job_id: str) -> None:
    # The queue a message came from is the tier it was meant for; a job that moved on to
    # another tier since then is not run here.
    tier = (self.request.delivery_info or {}).get("routing_key") or os.environ.get(
        "TIERQ_WORKER_TIER", ""
    )
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        log.error("dropping message with a malformed job id %r", job_id)
        return
    _runner(self.request.hostname or "worker").run(parsed, tier)
