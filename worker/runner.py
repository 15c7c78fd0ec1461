"""Running one job: claim → choose → call → apply(decide(...)).

1. One transaction claims the job (a lease), reads its conversation, chooses a backend of
   the tier and takes one of its call slots (``routing.choose``). A tier that is full or has
   nothing alive, or a deadline already past, is an outcome decided right there.
2. The call runs on the process's event loop (``worker.calls``) with no database connection
   held; the lease keeper renews the lease meanwhile and stops the call if it must stop.
3. One transaction records the outcome: an answer ends the job; anything else is recorded
   (attempt row, breaker) and handed to the failure policy (``tierq.policy.decide``), whose
   decision ``worker.apply`` turns into the job's next transition.

The job's deadline bounds everything: the call never runs past it, and the policy does not
wait for a retry due after it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from tierq import broker, leases, routes, streams, transitions
from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.crash import crash_point
from tierq.db import session_scope
from tierq.errors import ErrorClass
from tierq.events import record_event
from tierq.features import fitted, needs
from tierq.models import Job, Turn
from tierq.policy import Expired, Failed, NoLiveBackend, Outcome, Stopped, TierFull, decide
from tierq.settings import Settings
from worker import circuit, minimal, routing
from worker.answers import build_request, completion, notice_prefix
from worker.apply import Claimed, apply, snapshot
from worker.backends import BackendClient, client_for
from worker.backends.base import BackendError, ChatAnswer, Delta
from worker.calls import Calls

log = logging.getLogger(__name__)
CONNECTIONS_PER_POOL = 8


@dataclass(frozen=True)
class Prepared:
    """A claimed job with a backend chosen and its call slot taken."""

    claimed: Claimed
    turns: list[Turn]
    route: routing.Route
    time_left: float | None  # seconds before the deadline, at the claim (database clock)


class JobRunner:
    def __init__(
        self, config: TierqConfig, settings: Settings, worker_name: str, calls: Calls
    ) -> None:
        self.config, self.settings, self.worker, self.calls = config, settings, worker_name, calls
        self._clients: dict[str, Iterator[BackendClient]] = {}
        self._clients_lock = threading.Lock()

    def client(self, backend: BackendConfig) -> BackendClient:
        """A client (and connection pool) of the backend's, per process: one for every
        CONNECTIONS_PER_POOL calls it takes at once, taken in turn. httpcore looks at every
        connection of a pool (a system call for each idle one) whenever a request starts or
        ends: with one pool of 64 connections that was half of the worker's CPU per call
        (bench/inflight.py: 30.8 ms per call with one pool, 17.0 with pools of 16, 14.9 of 8,
        18.2 of 4)."""
        with self._clients_lock:
            if backend.name not in self._clients:
                pools = -(-backend.max_concurrency // CONNECTIONS_PER_POOL)
                made = [client_for(backend) for _ in range(pools)]
                self._clients[backend.name] = itertools.cycle(made)
            return next(self._clients[backend.name])

    def run(self, job_id: uuid.UUID, tier_name: str) -> None:
        tier = self.config.tier(tier_name)
        prepared = self._claim_and_choose(job_id, tier)
        if prepared is None:
            return
        started = time.monotonic()
        try:
            outcome = self._call(prepared)
            latency = (time.monotonic() - started) * 1000
            crash_point("worker.after_call")
            publish_to = self._record(prepared, outcome, latency)
        except SQLAlchemyError:
            raise  # the database's: the lease runs out and the relay queues the job again
        except Exception as exc:  # the request broke tierq itself: trying again would too
            self._broken(prepared, exc, (time.monotonic() - started) * 1000)
            return
        if publish_to:
            broker.publish(job_id, publish_to)

    # -- 1. claim and choose ------------------------------------------------------------
    def _claim_and_choose(self, job_id: uuid.UUID, tier: TierConfig) -> Prepared | None:
        """One transaction: the claim, the conversation, the backend and its call slot, the
        `calling` event; or, when nothing can be called, the policy's decision."""
        claimed = False
        try:
            with session_scope() as session:
                found = leases.claim_and_load(
                    session, job_id, tier.name, self.worker, self.settings.lease_seconds
                )
                if found is None:
                    log.info("job %s: not claimable on %s (duplicate or moved on)", job_id, tier)
                    return None
                lease, job, time_left = found
                claimed = True
                # Claimed and nothing else done; dying here rolls the claim back with the rest.
                crash_point("worker.after_claim")
                turns = self._turns(session, job)
                chain = routes.of_job(self.config, job.route)
                original = build_request(job, turns, chain.steps[0], first_step=True)
                held = Claimed(lease, job, tier, original, chain)
                route = self._choose(session, held, time_left)
                if isinstance(route, routing.Route):
                    record_event(
                        session, job_id, "calling", backend=route.backend.name, tier=tier.name
                    )
                    return Prepared(held, turns, route, time_left)
                decision = decide(route, snapshot(session, self.config, held, None))
                publish_to = apply(session, self.config, held, decision)
        except Exception as exc:
            if claimed:
                self._preparation_failed(job_id, exc)
            raise
        if publish_to:
            broker.publish(job_id, publish_to)
        return None

    def _choose(
        self, session: Session, claimed: Claimed, time_left: float | None
    ) -> routing.Route | Outcome:
        if time_left is not None and time_left <= 0:
            return Expired()
        job = claimed.job
        route = routing.choose(
            session,
            self.config,
            claimed.tier,
            claimed.lease,
            job.pinned_backend,
            lease_seconds=self.settings.lease_seconds,
            needs=needs(claimed.original),
        )
        if isinstance(route, routing.Full):
            return TierFull(route.backends)
        return route if route is not None else NoLiveBackend()

    def _turns(self, session: Session, job: Job) -> list[Turn]:
        """The conversation so far."""
        return list(
            session.scalars(
                select(Turn)
                .where(Turn.conversation_id == job.conversation_id, Turn.seq < job.answer_seq)
                .order_by(Turn.seq)
            )
        )

    def _preparation_failed(self, job_id: uuid.UUID, exc: Exception) -> None:
        reason = where_it_broke(exc)
        fatal = not isinstance(exc, SQLAlchemyError)
        try:
            with session_scope() as session:
                limit = self.settings.max_deliveries
                if transitions.preparation_failed(session, job_id, limit, reason, fatal):
                    log.error("job %s ended: preparing its call failed: %s", job_id, reason)
        except Exception as counting:  # the database may be what failed: try again next time
            log.warning("job %s: could not count the failure: %s", job_id, counting)

    def _broken(self, prepared: Prepared, exc: Exception, latency: float) -> None:
        """A call that raised what no backend failure is (a request tierq cannot encode, a
        bug it meets): the job fails at once with the reason, its call slot and lease freed,
        the backend's breaker untouched. Never redelivered to break a worker again."""
        claimed, route = prepared.claimed, prepared.route
        reason = f"tierq could not make the call: {where_it_broke(exc)}"
        log.error("job %s: %s", claimed.job.id, reason)  # the kind and place, no content
        with session_scope() as session:
            transitions.record_attempt(
                session, claimed.lease, tier=claimed.tier.name, backend=route.backend.name,
                outcome="error", error_class="internal", error_message=reason,
                latency_ms=latency,
            )  # fmt: skip
            circuit.release_trial(session, route.permit)
            leases.let_go(session, claimed.lease)
            transitions.fail(session, claimed.lease, reason)

    # -- 2. call ------------------------------------------------------------------------
    def _call(self, prepared: Prepared) -> ChatAnswer | Failed | Stopped:
        """The backend call, with no database connection held; a streaming job's tokens go
        out as they arrive. Bounded by the job's deadline."""
        claimed, backend = prepared.claimed, prepared.route.backend
        step, first = claimed.step, claimed.first_step
        request = fitted(build_request(claimed.job, prepared.turns, step, first), backend.lacks)
        model = None if first else step.degrade.model
        notice = None if first else step.degrade.notice
        seconds = _sooner(prepared.time_left, step.call_timeout)
        streamed = bool(request.pop("stream", False)) and streams.available()
        client = self.client(backend)
        job_id = claimed.job.id

        async def call(emit: Callable[[Delta], None]) -> ChatAnswer:
            try:
                client.check_fits(request)
                async with asyncio.timeout(seconds):
                    if not streamed:
                        return await client.chat(request, model=model, timeout=seconds)
                    if notice:  # the stored answer starts with it: so does the streamed one
                        emit({"content": notice_prefix(notice)})
                    return await client.stream(request, model=model, timeout=seconds, on_delta=emit)
            except TimeoutError:
                why = "the job's deadline" if seconds == prepared.time_left else "call_timeout"
                raise BackendError(
                    ErrorClass.TIMEOUT, f"{backend.name}: {why} came mid-call"
                ) from None

        sent: list[bool] = []

        def on_delta(delta: Delta) -> None:
            streams.append(job_id, "delta", delta)
            sent.append(True)

        crash_point(
            "worker.before_call", subject=prepared.turns[-1].content if prepared.turns else ""
        )
        try:
            result = self.calls.run(claimed.lease, call, on_delta if streamed else None)
        except BackendError as error:
            result = Failed(error.error_class, error.message, error.retry_after, backend.name)
        if sent and not isinstance(result, ChatAnswer):
            streams.append(job_id, "reset")  # what readers were shown is void
        if isinstance(result, Stopped):
            return Stopped(result.why, backend.name)
        return result

    # -- 3. record and decide ------------------------------------------------------------
    def _record(
        self, prepared: Prepared, outcome: ChatAnswer | Failed | Stopped, latency: float
    ) -> str | None:
        """Returns the queue to publish the job to after this, if it is queued again."""
        if isinstance(outcome, ChatAnswer):
            self._answered(prepared, outcome, latency)
            return None
        claimed, route = prepared.claimed, prepared.route
        name = route.backend.name
        log.info("job %s: %s on %s", claimed.job.id, _describe(outcome), name)
        with session_scope() as session:
            attempt = _attempt(claimed, name, outcome, latency)
            transitions.record_attempt(session, claimed.lease, **attempt)
            if isinstance(outcome, Failed):
                # A request the backend rejects says nothing about the backend's health.
                healthy = not outcome.error_class.retryable
                breaker = self.config.breaker_for(name)
                circuit.record(session, route.permit, healthy, breaker, reason=str(outcome))
            else:
                circuit.release_trial(session, route.permit)  # a stopped call says nothing
            # The call has ended. On a job that ended meanwhile (cancelled) the slot and lease
            # are freed here; on one still ours, the decision's transition frees them.
            leases.let_go(session, claimed.lease)
            decision = decide(outcome, snapshot(session, self.config, claimed, route.backend))
            return apply(session, self.config, claimed, decision, backend=name)

    def _answered(self, prepared: Prepared, answer: ChatAnswer, latency: float) -> None:
        """One transaction: the attempt row, its breaker outcome (a half-open trial's slot
        among them), the call slot, the fenced answer and the successors' doorbells. A lost
        lease makes only the fenced writes match nothing; the outage record still commits."""
        claimed, route = prepared.claimed, prepared.route
        job, tier, name = claimed.job, claimed.tier, route.backend.name
        first = claimed.first_step
        quality = "full" if first else "reduced"
        notice = None if first else claimed.step.degrade.notice
        result = completion(
            job, answer, tier=tier.name, backend=name, quality=quality, notice=notice
        )
        with session_scope() as session:
            transitions.add_attempt(
                session,
                claimed.lease,
                tier=tier.name,
                backend=name,
                outcome="ok",
                latency_ms=latency,
            )
            answered = transitions.succeed(
                session, claimed.lease, job, result, backend=name, model=answer.model,
                quality=quality, cache_key=minimal.cache_key(claimed.original), count_attempt=True,
            )  # fmt: skip
            waiting = transitions.successors(session, job.id) if answered else []
            if not answered:  # cancelled meanwhile: the call has ended, its slot is free now
                leases.let_go(session, claimed.lease)
            # Last: the backend's row is every call's, and its lock is held until the commit.
            breaker = self.config.breaker_for(name)
            circuit.record(session, route.permit, True, breaker, latency_ms=latency)
            crash_point("worker.before_commit")
        if not answered:
            log.warning("job %s: lease lost before the answer was saved", job.id)
            return
        if job.request.get("stream"):
            streams.append(job.id, "end")
        for successor, successor_tier in waiting:
            broker.publish(successor, successor_tier)


def where_it_broke(exc: BaseException) -> str:
    """An exception's kind and the line that raised it, never its message: messages quote
    the values they choked on, and those are the request's content."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{place}"


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _attempt(
    claimed: Claimed, backend: str, outcome: Failed | Stopped, latency: float
) -> dict[str, object]:
    if isinstance(outcome, Failed):
        kind, message = str(outcome.error_class), outcome.message[:2000]
        return {"tier": claimed.tier.name, "backend": backend, "outcome": "error",
                "error_class": kind, "error_message": message, "latency_ms": latency}  # fmt: skip
    return {"tier": claimed.tier.name, "backend": backend, "outcome": "stopped",
            "error_class": str(outcome.why), "latency_ms": latency}  # fmt: skip


def _describe(outcome: Failed | Stopped) -> str:
    if isinstance(outcome, Failed):
        return f"{outcome.error_class}: {outcome.message}"
    return f"stopped ({outcome.why})"
