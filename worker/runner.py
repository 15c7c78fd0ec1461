"""Running one job: claim it, call a backend of this tier, record what happened.

The outcome of a call decides the next state (DESIGN.md, job lifecycle): an answer ends the
job; a retryable error waits in ``retry_wait`` (the relay wakes it, nothing sleeps here);
an exhausted tier escalates to the next; nothing left parks the job or fails it.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierq import broker
from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.crash import crash_point
from tierq.db import db_now, session_scope
from tierq.models import Job, JobStatus, Turn
from tierq.settings import Settings
from worker import claim
from worker.backends import BackendClient, client_for
from worker.backends.base import BackendError, ChatAnswer, ErrorClass
from worker.lease_keeper import kept_alive

log = logging.getLogger(__name__)


def build_request(
    job: Job, turns: list[Turn], tier: TierConfig, first_tier: bool
) -> dict[str, Any]:
    """The OpenAI-shaped request for this tier: the conversation so far, degraded if needed."""
    request: dict[str, Any] = dict(job.request)
    request["messages"] = [{"role": t.role, "content": t.content} for t in turns]
    if not first_tier:
        rules = tier.degrade
        if rules.max_tokens is not None:
            request["max_tokens"] = min(
                request.get("max_tokens") or rules.max_tokens, rules.max_tokens
            )
        if rules.temperature is not None:
            request["temperature"] = rules.temperature
    return request


def completion(
    job: Job, answer: ChatAnswer, *, tier: str, backend: str, quality: str, notice: str | None
) -> dict[str, Any]:
    content = f"{notice}\n\n{answer.content}" if notice else answer.content
    return {
        "id": f"chatcmpl-{job.id.hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
        "tierq": {"tier": tier, "backend": backend, "quality": quality},
    }


def backoff(tier: TierConfig, tries: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, capped; never sooner than ``Retry-After``."""
    ceiling = min(tier.retry.max_delay, tier.retry.base_delay * 2 ** max(tries - 1, 0))
    return max(random.uniform(0, ceiling), retry_after or 0.0)


class JobRunner:
    def __init__(self, config: TierqConfig, settings: Settings, worker_name: str) -> None:
        self.config, self.settings, self.worker = config, settings, worker_name
        self._clients: dict[str, BackendClient] = {}

    def client(self, backend: BackendConfig) -> BackendClient:
        """One client (and connection pool) per backend, per process: made after the fork."""
        if backend.name not in self._clients:
            self._clients[backend.name] = client_for(backend)
        return self._clients[backend.name]

    def run(self, job_id: uuid.UUID, tier_name: str) -> None:
        with session_scope() as session:
            lease = claim.claim(
                session, job_id, tier_name, self.worker, self.settings.lease_seconds
            )
        if lease is None:
            log.info(
                "job %s: not claimable on %s (duplicate or moved on); dropped", job_id, tier_name
            )
            return
        crash_point("worker.after_claim")
        with kept_alive(lease, self.settings.lease_seconds):
            self._run_claimed(lease, tier_name)

    def _load(self, session: Session, lease: claim.Lease) -> tuple[Job, list[Turn]]:
        job = session.get_one(Job, lease.job_id)
        turns = list(
            session.scalars(
                select(Turn)
                .where(Turn.conversation_id == job.conversation_id, Turn.seq < job.answer_seq)
                .order_by(Turn.seq)
            )
        )
        return job, turns

    def _run_claimed(self, lease: claim.Lease, tier_name: str) -> None:
        with session_scope() as session:
            if claim.deadline_passed(session, lease.job_id):
                claim.end(session, lease, JobStatus.FAILED, "deadline passed before an answer")
                return
            job, turns = self._load(session, lease)
        tier = self.config.tier(tier_name)
        first_tier = tier_name == self.config.tier_names[0]
        backend = tier.backends[job.tier_attempts % len(tier.backends)]
        request = build_request(job, turns, tier, first_tier)
        started = time.monotonic()
        crash_point("worker.before_call", subject=turns[-1].content if turns else "")
        try:
            answer = self.client(backend).chat(request)
        except BackendError as error:
            self._on_error(lease, job, tier, backend.name, error, started)
            return
        crash_point("worker.after_call")
        quality = "full" if first_tier else "reduced"
        result = completion(
            job,
            answer,
            tier=tier_name,
            backend=backend.name,
            quality=quality,
            notice=None if first_tier else tier.degrade.notice,
        )
        with session_scope() as session:
            claim.record_attempt(
                session,
                lease,
                tier=tier_name,
                backend=backend.name,
                outcome="ok",
                latency_ms=_ms(started),
            )
            if not claim.succeed(
                session,
                lease,
                job,
                result,
                backend=backend.name,
                model=answer.model,
                quality=quality,
            ):
                log.warning("job %s: lease lost before the answer was saved", job.id)
                session.rollback()
                return
            crash_point("worker.before_commit")
        self._publish_successors(job.id)

    def _on_error(
        self,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        backend: str,
        error: BackendError,
        started: float,
    ) -> None:
        log.info("job %s: %s on %s: %s", job.id, error.error_class, backend, error.message)
        publish_to: str | None = None
        with session_scope() as session:
            claim.record_attempt(
                session,
                lease,
                tier=tier.name,
                backend=backend,
                outcome="error",
                error_class=str(error.error_class),
                error_message=error.message[:2000],
                latency_ms=_ms(started),
            )
            tries = job.tier_attempts + 1
            if error.error_class is ErrorClass.CLIENT:
                claim.end(
                    session,
                    lease,
                    JobStatus.FAILED,
                    f"{backend} refused the request: {error.message}",
                )
            elif error.error_class.retryable and tries < tier.retry.attempts:
                claim.retry_later(session, lease, backoff(tier, tries, error.retry_after))
            else:
                publish_to = self._exhausted(session, lease, job, tier)
        if publish_to:
            broker.publish(job.id, publish_to)

    def _exhausted(
        self, session: Session, lease: claim.Lease, job: Job, tier: TierConfig
    ) -> str | None:
        """This tier is out of tries: the next tier, or what the request accepts after it."""
        next_tier = self.config.next_tier(tier.name)
        if next_tier is not None:
            claim.escalate(session, lease, next_tier)
            return next_tier
        policy = job.on_exhausted or self.config.on_exhausted
        if policy == "fail":
            claim.end(session, lease, JobStatus.FAILED, "every tier failed")
        elif policy == "degrade" and self.config.minimal.static_message:
            self._static_answer(session, lease, job)
        else:
            emergency = self.config.emergency
            claim.end(
                session,
                lease,
                JobStatus.PARKED,
                emergency.message,
                tier=self.config.tier_names[0],
                tier_attempts=0,
                due_at=db_now(emergency.retry_after),
            )
        return None

    def _static_answer(self, session: Session, lease: claim.Lease, job: Job) -> None:
        message = self.config.minimal.static_message or ""
        answer = ChatAnswer(
            content=message,
            finish_reason="stop",
            prompt_tokens=0,
            completion_tokens=len(message.split()),
            model="tierq-static",
        )
        result = completion(
            job, answer, tier="minimal", backend="static", quality="static", notice=None
        )
        claim.succeed(
            session, lease, job, result, backend="static", model="tierq-static", quality="static"
        )

    def _publish_successors(self, job_id: uuid.UUID) -> None:
        with session_scope() as session:
            waiting = claim.successors(session, job_id)
        for successor, tier in waiting:
            broker.publish(successor, tier)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
