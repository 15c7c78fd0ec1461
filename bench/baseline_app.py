"""The submit baseline: a bare FastAPI endpoint doing one INSERT and one ``apply_async``.

No validation, no auth, no conversation: what any durable submit must at least cost.
"""

from __future__ import annotations

import os
import uuid

from celery import Celery
from fastapi import FastAPI
from sqlalchemy import Column, MetaData, String, Table, Text, insert

from tierq.broker import configure
from tierq.db import make_engine
from tierq.settings import Settings

settings = Settings()
engine = make_engine(os.environ["TIERQ_DATABASE_URL"])
metadata = MetaData()
baseline_jobs = Table(
    "baseline_jobs", metadata, Column("id", String(36), primary_key=True), Column("body", Text)
)
metadata.create_all(engine)
celery = Celery("baseline", set_as_current=False)
configure(celery, settings)
app = FastAPI()


@app.post("/submit", status_code=202)
def submit(body: dict) -> dict:  # type: ignore[type-arg]
    job_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(insert(baseline_jobs).values(id=job_id, body=str(body)))
    celery.send_task("baseline.run", args=[job_id], queue="baseline")
    return {"id": job_id}
