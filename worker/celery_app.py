"""The worker's Celery application: tierq's shared transport config plus the task."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from functools import lru_cache
from typing import Any

from celery import Task
from celery.signals import worker_process_init

from tierq.broker import RUN_JOB, get_celery
from tierq.config import load_config
from tierq.db import get_engine
from tierq.settings import get_settings
from worker.runner import JobRunner
from worker.webhook_delivery import deliver_webhook  # noqa: F401 - registers the task

log = logging.getLogger(__name__)
app = get_celery()


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool child must not share its parent's database sockets.
    get_engine().dispose(close=False)


@lru_cache
def _runner() -> JobRunner:
    settings = get_settings()
    name = f"{socket.gethostname()}:{os.getpid()}"
    return JobRunner(load_config(settings.config), settings, name)


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
    _runner().run(parsed, tier)
