"""The worker's Celery application: tierq's shared transport config plus the task."""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from functools import lru_cache
from typing import Any

from celery import Task
from celery.signals import celeryd_init, worker_process_init

from tierq.broker import RUN_JOB, get_celery
from tierq.config import load_config
from tierq.db import get_engine
from tierq.settings import get_settings
from worker.lease_keeper import give_back_leases
from worker.runner import JobRunner
from worker.webhook_delivery import deliver_webhook  # noqa: F401 - registers the task

log = logging.getLogger(__name__)
app = get_celery()


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool child must not share its parent's database sockets.
    get_engine().dispose(close=False)


@celeryd_init.connect
def _give_leases_back_at_exit(sender: str, **_: Any) -> None:
    # atexit runs as the main process ends, after the pool is stopped; forked pool
    # children inherit the handler but leave through os._exit, and the pid check is
    # there should one ever exit normally.
    main_pid = os.getpid()

    def give_back() -> None:
        if os.getpid() != main_pid:
            return
        try:
            if released := give_back_leases(sender):
                log.warning("gave back the leases of %d interrupted job(s)", released)
        except Exception as exc:  # the database may be down: the leases run out instead
            log.warning("could not give back leases at exit: %s", type(exc).__name__)

    atexit.register(give_back)


@lru_cache
def _runner(worker_node: str) -> JobRunner:
    # The lease owner names the Celery node (tier@host) and the pool process, so the node's
    # main process can give its leases back when it stops.
    settings = get_settings()
    return JobRunner(load_config(settings.config), settings, f"{worker_node}:{os.getpid()}")


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
