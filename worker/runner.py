"""Running one job: claim it, pick a live backend of this tier, call it, record the outcome.

The outcome decides the next state (DESIGN.md, job lifecycle): an answer ends the job; a
retryable error waits in ``retry_wait`` (the relay wakes it; nothing sleeps here); an
exhausted tier, or one with no live backend, passes the job on at once to the next tier;
after the last model tier the request's ``on_exhausted`` decides: the minimal tier, parking
or failing. A tier whose backends are all at their concurrency cap is busy, not dead: the job
waits briefly on it (see ``_wait_for_slot``).

The job's deadline bounds everything: a call's timeouts never run past it, a retry due
after it is not waited for, and a backend asking (Retry-After) for a longer wait than the
tier's ``max_delay`` is routed around instead of waited on.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
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
# The shortest wait for a slot on a full tier; the relay's sweep interval rounds it up anyway.
FULL_TIER_MIN_DELAY = 0.1


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


def notice_prefix(notice: str) -> str:
    return f"{notice}\n\n"


def completion(
    job: Job, answer: ChatAnswer, *, tier: str, backend: str, quality: str, notice: str | None
) -> dict[str, Any]:
    content = notice_prefix(notice) + answer.content if notice else answer.content
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


def backoff(tier: TierConfig, tries: int, retry_after: float | None) -> float | None:
    """Exponential backoff with full jitter, capped; never sooner than ``Retry-After``.

    None when the backend asks for a longer wait than the tier's ``max_delay``: holding the
    job that long while other tiers may be alive is waiting on failure, not routing around it.
    """
    if retry_after is not None and retry_after > tier.retry.max_delay:
        return None
    ceiling = min(tier.retry.max_delay, tier.retry.base_delay * 2 ** max(tries - 1, 0))
    return max(random.uniform(0, ceiling), retry_after or 0.0)


def full_tier_delay(tier: TierConfig) -> float:
    """How long a job waits for a free slot: short, jittered so that the jobs waiting on one
    tier do not all come back at once, never above the tier's ``max_delay``."""
    base = max(tier.retry.base_delay, FULL_TIER_MIN_DELAY)
    return min(random.uniform(base, 2 * base), max(tier.retry.max_delay, FULL_TIER_MIN_DELAY))


@dataclass(frozen=True)
class Call:
    """One backend call: where, with which model (None: the backend's own), how many
    seconds it may take at most (None: the backend's timeouts alone), and the degraded
    tier's notice that leads the answer (None on the first tier)."""

    backend: BackendConfig
    model: str | None
    seconds: float | None
    notice: str | None = None


@dataclass(frozen=True)
class _Prepared:
    """A claimed job ready for its call: the call slot on ``route`` is taken."""

    job: Job
    turns: list[Turn]
    original: dict[str, Any]  # the first tier's request: the minimal tier's cache key
    route: routing.Route
    time_left: float | None  # seconds before the deadline, at the claim (database clock)


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
        tier = self.config.tier(tier_name)
        # One transaction claims the job and prepares its call (the call slot, the `calling`
        # event): both are committed before the call starts, and each transaction costs a
        # pool check-out with its ping, a BEGIN and a COMMIT.
        claimed = None
        try:
            with session_scope() as session:
                claimed = claim.claim_and_load(
                    session, job_id, tier_name, self.worker, self.settings.lease_seconds
                )
                if claimed is None:
                    log.info(
                        "job %s: not claimable on %s (duplicate or moved on); dropped",
                        job_id,
                        tier_name,
                    )
                    return
                lease, job, time_left = claimed
                # Claimed and nothing else done; dying here rolls the claim back with the rest.
                crash_point("worker.after_claim")
                prepared = self._prepare(session, lease, job, time_left, tier)
        except Exception as exc:
            if claimed is not None:
                self._preparation_failed(job_id, exc)
            raise
        if isinstance(prepared, _Prepared):
            with kept_alive(lease, self.settings.lease_seconds):
                publish_to = self._call_and_record(lease, tier, prepared)
        else:
            publish_to = prepared
        if publish_to:
            broker.publish(job_id, publish_to)

    def _preparation_failed(self, job_id: uuid.UUID, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        try:
            with session_scope() as session:
                limit = self.settings.max_deliveries
                if claim.preparation_failed(session, job_id, limit, reason):
                    log.error("job %s is dead: preparing its call failed %d times", job_id, limit)
        except Exception as counting:  # the database may be what failed: try again next time
            log.warning("job %s: could not count the failure: %s", job_id, counting)

    def _turns(self, session: Session, job: Job) -> list[Turn]:
        """The conversation so far."""
        return list(
            session.scalars(
                select(Turn)
                .where(Turn.conversation_id == job.conversation_id, Turn.seq < job.answer_seq)
                .order_by(Turn.seq)
            )
        )

    def _prepare(
        self,
        session: Session,
        lease: claim.Lease,
        job: Job,
        time_left: float | None,
        tier: TierConfig,
    ) -> _Prepared | str | None:
        """In the claim's transaction: a backend and its call slot, or what happened instead
        (the queue to publish the job to if it moved to another tier, else None)."""
        first = self.config.tier(self.config.tier_names[0])
        turns = self._turns(session, job)
        if time_left is not None and time_left <= 0:
            claim.end(session, lease, JobStatus.FAILED, "deadline passed before an answer")
            return None
        original = build_request(job, turns, first, first_tier=True)
        route = routing.choose(session, self.config, tier, lease, job.pinned_backend)
        if isinstance(route, routing.Full):
            return self._wait_for_slot(session, lease, job, tier, original, route)
        if route is None:
            return self._exhausted(
                session, lease, job, tier, original, f"no live backend in tier {tier.name}"
            )
        record_event(session, job.id, "calling", backend=route.backend.name, tier=tier.name)
        return _Prepared(job, turns, original, route, time_left)

    def _call_and_record(
        self, lease: claim.Lease, tier: TierConfig, prepared: _Prepared
    ) -> str | None:
        """Returns the queue to publish the job to after this, if it moved to another tier."""
        job, turns, route = prepared.job, prepared.turns, prepared.route
        first_tier = tier.name == self.config.tier_names[0]
        request = build_request(job, turns, tier, first_tier=first_tier)
        call = Call(
            route.backend,
            model=None if first_tier else tier.degrade.model,
            # Not a moment past the deadline: the answer would be thrown away anyway.
            seconds=prepared.time_left,
            notice=None if first_tier else tier.degrade.notice,
        )
        started = time.monotonic()
        crash_point("worker.before_call", subject=turns[-1].content if turns else "")
        try:
            answer = self._call(call, request, job.id)
        except BackendError as error:
            return self._on_error(lease, job, tier, route, error, prepared.original, started)
        crash_point("worker.after_call")
        self._on_answer(lease, job, tier, route, answer, prepared.original, started)
        return None

    def _call(self, call: Call, request: dict[str, Any], job_id: uuid.UUID) -> ChatAnswer:
        """Call the backend; a streaming job's tokens go out as they arrive."""
        client = self.client(call.backend)
        if not request.pop("stream", False) or not streams.available():
            return client.chat(request, model=call.model, timeout=call.seconds)
        tokens = client.stream(request, model=call.model, timeout=call.seconds)
        # Timeouts bound each read; a stream that keeps trickling is bounded here.
        ends = None if call.seconds is None else time.monotonic() + call.seconds
        sent = False
        try:
            if call.notice:  # the stored answer starts with it: so does the streamed one
                streams.append(job_id, "delta", notice_prefix(call.notice))
                sent = True
            while True:
                streams.append(job_id, "delta", next(tokens))
                sent = True
                if ends is not None and time.monotonic() > ends:
                    tokens.close()
                    raise BackendError(
                        ErrorClass.TIMEOUT,
                        f"{call.backend.name}: the job's deadline came mid-stream",
                    )
        except StopIteration as done:
            return done.value
        except BackendError:
            if sent:
                streams.append(job_id, "reset")
            raise

    def _wait_for_slot(
        self,
        session: Session,
        lease: claim.Lease,
        job: Job,
        tier: TierConfig,
        original: dict[str, Any],
        full: routing.Full,
    ) -> str | None:
        """Every backend of the tier is at its concurrency cap. A full tier is not a dead
        one, and the tiers after it are smaller or cost money, so the job waits a short
        while in retry_wait on this tier (no try used up: nothing was called) and the relay
        wakes it. Only when its deadline would pass first does it move on to the next tier.
        """
        delay = full_tier_delay(tier)
        busy = ", ".join(full.backends)
        if claim.deadline_within(session, job.id, delay):
            return self._exhausted(
                session,
                lease,
                job,
                tier,
                original,
                f"tier {tier.name} is full ({busy}) and the deadline is too near to wait",
            )
        claim.retry_later(
            session, lease, delay, reason=f"tier {tier.name} is full: {busy} at their cap"
        )
        return None

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
        # One transaction: the attempt row, its breaker outcome (a half-open trial's slot
        # among them), the call slot, the fenced answer and the successors' doorbells. A lost
        # lease makes only the fenced writes match nothing; the outage record still commits.
        with session_scope() as session:
            claim.add_attempt(
                session, lease, tier=tier.name, backend=name, outcome="ok", latency_ms=latency
            )
            circuit.record(
                session, route.permit, True, self.config.breaker_for(name), latency_ms=latency
            )
            # The release counts the attempt and gives the call slot back.
            answered = claim.succeed(
                session,
                lease,
                job,
                result,
                backend=name,
                model=answer.model,
                quality=quality,
                cache_key=minimal.cache_key(original),
                count_attempt=True,
            )
            waiting = claim.successors(session, job.id) if answered else []
            crash_point("worker.before_commit")
        if not answered:
            log.warning("job %s: lease lost before the answer was saved", job.id)
            return
        if job.request.get("stream"):
            streams.append(job.id, "end")
        for successor, successor_tier in waiting:
            broker.publish(successor, successor_tier)

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
            claim.end_call(session, lease)
        # What happens next is fenced by the lease; the record above stands either way.
        with session_scope() as session:
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
        if claim.deadline_passed(session, job.id):
            claim.end(session, lease, JobStatus.FAILED, f"deadline passed; last: {error}")
            return None
        tries = job.tier_attempts + 1
        delay = backoff(tier, tries, error.retry_after)
        if delay is None:
            return self._exhausted(
                session,
                lease,
                job,
                tier,
                original,
                f"{backend} asks to wait {error.retry_after:g}s, longer than tier "
                f"{tier.name}'s max_delay of {tier.retry.max_delay:g}s; last: {error}",
            )
        row = session.get_one(Backend, backend)
        # A backend that hangs or is gone would cost the client another full timeout; with
        # no other backend in the tier to try, the next tier is the faster answer.
        unreachable = error.error_class in (ErrorClass.TIMEOUT, ErrorClass.CONNECT)
        if (
            not (unreachable and len(tier.backends) == 1)
            and tries < tier.retry.attempts
            and circuit.retry_allowed(
                row, tier.retry.budget, self.config.breaker_for(backend).min_calls
            )
            # A retry due after the deadline could only fail it: the next tier may not.
            and not claim.deadline_within(session, job.id, delay)
        ):
            if claim.retry_later(session, lease, delay, reason=str(error)):
                circuit.count_retry(session, backend)
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
        moved = claim.escalate(
            session, lease, tier.name, target, "context too long", backend.larger_context
        )
        return target if moved else None

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
            # A worker that lost the job publishes nothing: its new owner decides.
            return (
                next_tier if claim.escalate(session, lease, tier.name, next_tier, reason) else None
            )
        policy = job.on_exhausted or self.config.on_exhausted
        if policy == "fail":
            claim.end(session, lease, JobStatus.FAILED, f"every tier failed; {reason}")
        elif policy == "degrade" and (
            found := minimal.answer(session, self.config.minimal, original, job.owner_id)
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


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
