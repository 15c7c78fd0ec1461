"""Running one job: claim it, pick a live backend of this tier, call it, record the outcome.

The outcome decides the next state (DESIGN.md, job lifecycle): an answer ends the job; a
retryable error waits in ``retry_wait`` (the relay wakes it; nothing sleeps here); an
exhausted tier, or one with no live backend, passes the job on at once to the next tier;
after the last model tier the request's ``on_exhausted`` decides: the minimal tier, parking
or failing.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierq import broker, streams
from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.crash import crash_point
from tierq.db import db_now, session_scope
from tierq.events import record_event
from tierq.models import Backend, Job, JobStatus, Turn
from tierq.settings import Settings
from worker import circuit, claim, minimal, routing
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
            publish_to = self._run_claimed(lease, self.config.tier(tier_name))
        if publish_to:
            broker.publish(job_id, publish_to)

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

    def _run_claimed(self, lease: claim.Lease, tier: TierConfig) -> str | None:
        """Returns the queue to publish the job to after this, if it moved to another tier."""
        first = self.config.tier(self.config.tier_names[0])
        with session_scope() as session:
            if claim.deadline_passed(session, lease.job_id):
                claim.end(session, lease, JobStatus.FAILED, "deadline passed before an answer")
                return None
            job, turns = self._load(session, lease)
            original = build_request(job, turns, first, first_tier=True)
            route = routing.choose(session, self.config, tier, job.pinned_backend)
            if route is None:
                return self._exhausted(
                    session, lease, job, tier, original, f"no live backend in tier {tier.name}"
                )
            record_event(session, job.id, "calling", backend=route.backend.name, tier=tier.name)
        request = build_request(job, turns, tier, first_tier=tier.name == first.name)
        started = time.monotonic()
        crash_point("worker.before_call", subject=turns[-1].content if turns else "")
        try:
            answer = self._call(route.backend, request, job.id)
        except BackendError as error:
            return self._on_error(lease, job, tier, route, error, original, started)
        crash_point("worker.after_call")
        self._on_answer(lease, job, tier, route, answer, original, started)
        return None

    def _call(
        self, backend: BackendConfig, request: dict[str, Any], job_id: uuid.UUID
    ) -> ChatAnswer:
        """Call the backend; a streaming job's tokens go out as they arrive."""
        if not request.pop("stream", False) or not streams.available():
            return self.client(backend).chat(request)
        tokens = self.client(backend).stream(request)
        sent = False
        try:
            while True:
                streams.append(job_id, "delta", next(tokens))
                sent = True
        except StopIteration as done:
            return done.value
        except BackendError:
            if sent:
                streams.append(job_id, "reset")
            raise

    def _on_answer(
        self,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        route: routing.Route,
        answer: ChatAnswer,
        original: dict[str, Any],
        started: float,
    ) -> None:
        first_tier = tier.name == self.config.tier_names[0]
        quality = "full" if first_tier else "reduced"
        name = route.backend.name
        result = completion(
            job,
            answer,
            tier=tier.name,
            backend=name,
            quality=quality,
            notice=None if first_tier else tier.degrade.notice,
        )
        latency = _ms(started)
        with session_scope() as session:
            claim.record_attempt(
                session, lease, tier=tier.name, backend=name, outcome="ok", latency_ms=latency
            )
            circuit.record(
                session, route.permit, True, self.config.breaker_for(name), latency_ms=latency
            )
            if not claim.succeed(
                session,
                lease,
                job,
                result,
                backend=name,
                model=answer.model,
                quality=quality,
                cache_key=minimal.cache_key(original),
            ):
                log.warning("job %s: lease lost before the answer was saved", job.id)
                session.rollback()
                return
            crash_point("worker.before_commit")
        if job.request.get("stream"):
            streams.append(job.id, "end")
        self._publish_successors(job.id)

    def _on_error(
        self,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        route: routing.Route,
        error: BackendError,
        original: dict[str, Any],
        started: float,
    ) -> str | None:
        backend = route.backend
        log.info("job %s: %s on %s: %s", job.id, error.error_class, backend.name, error.message)
        with session_scope() as session:
            claim.record_attempt(
                session,
                lease,
                tier=tier.name,
                backend=backend.name,
                outcome="error",
                error_class=str(error.error_class),
                error_message=error.message[:2000],
                latency_ms=_ms(started),
            )
            # A request the backend rejects says nothing about the backend's health.
            healthy_refusal = not error.error_class.retryable
            circuit.record(
                session,
                route.permit,
                healthy_refusal,
                self.config.breaker_for(backend.name),
                reason=str(error),
            )
            if error.error_class is ErrorClass.CLIENT:
                claim.end(
                    session,
                    lease,
                    JobStatus.FAILED,
                    f"{backend.name} refused the request: {error.message}",
                )
                return None
            if error.error_class is ErrorClass.CONTEXT_LENGTH:
                return self._larger_context(session, lease, job, tier, backend, error)
            return self._retry_or_move_on(session, lease, job, tier, backend.name, error, original)

    def _retry_or_move_on(
        self,
        session: Session,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        backend: str,
        error: BackendError,
        original: dict[str, Any],
    ) -> str | None:
        tries = job.tier_attempts + 1
        delay = backoff(tier, tries, error.retry_after)
        row = session.get_one(Backend, backend)
        # A backend that hangs or is gone would cost the client another full timeout; with
        # no other backend in the tier to try, the next tier is the faster answer.
        unreachable = error.error_class in (ErrorClass.TIMEOUT, ErrorClass.CONNECT)
        if (
            not (unreachable and len(tier.backends) == 1)
            and tries < tier.retry.attempts
            and circuit.retry_allowed(row, tier.retry.budget)
            and not claim.deadline_within(session, job.id, delay)
        ):
            circuit.count_retry(session, backend)
            claim.retry_later(session, lease, delay, reason=str(error))
            return None
        return self._exhausted(
            session,
            lease,
            job,
            tier,
            original,
            f"tier {tier.name} exhausted after {tries} tries; last: {error}",
        )

    def _larger_context(
        self,
        session: Session,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        backend: BackendConfig,
        error: BackendError,
    ) -> str | None:
        if backend.larger_context is None:
            claim.end(
                session,
                lease,
                JobStatus.FAILED,
                f"the conversation does not fit {backend.name}'s context and no backend "
                f"with a larger one is configured: {error.message}",
            )
            return None
        target = self.config.tier_of(backend.larger_context).name
        claim.escalate(
            session, lease, tier.name, target, "context too long", backend.larger_context
        )
        return target

    def _exhausted(
        self,
        session: Session,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        original: dict[str, Any],
        reason: str,
    ) -> str | None:
        """This tier cannot answer: the next tier, or what the request accepts after it."""
        next_tier = self.config.next_tier(tier.name)
        if next_tier is not None:
            claim.escalate(session, lease, tier.name, next_tier, reason)
            return next_tier
        policy = job.on_exhausted or self.config.on_exhausted
        if policy == "fail":
            claim.end(session, lease, JobStatus.FAILED, f"every tier failed; {reason}")
        elif policy == "degrade" and (
            found := minimal.answer(session, self.config.minimal, original)
        ):
            self._minimal_answer(session, lease, job, found)
        else:
            self._park(session, lease, reason)
        return None

    def _park(self, session: Session, lease: claim.Lease, reason: str) -> None:
        emergency = self.config.emergency
        claim.end(
            session,
            lease,
            JobStatus.PARKED,
            f"{emergency.message} ({reason})",
            tier=self.config.tier_names[0],
            tier_attempts=0,
            pinned_backend=None,
            due_at=db_now(emergency.retry_after),
        )

    def _minimal_answer(
        self, session: Session, lease: claim.Lease, job: Job, found: minimal.MinimalAnswer
    ) -> None:
        answer = ChatAnswer(
            content=found.content,
            finish_reason="stop",
            prompt_tokens=0,
            completion_tokens=len(found.content.split()),
            model=f"tierq-{found.quality}",
        )
        result = completion(
            job, answer, tier="minimal", backend=found.source, quality=found.quality, notice=None
        )
        claim.succeed(
            session,
            lease,
            job,
            result,
            backend=found.source,
            model=answer.model,
            quality=found.quality,
        )

    def _publish_successors(self, job_id: uuid.UUID) -> None:
        with session_scope() as session:
            waiting = claim.successors(session, job_id)
        for successor, tier in waiting:
            broker.publish(successor, tier)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
