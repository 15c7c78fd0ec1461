"""Applying a decision of the failure policy (``tierq.policy.decide``): the one place where a
``Decision`` becomes a transition of the job (``tierq.transitions``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, assert_never

from sqlalchemy.orm import Session

from tierq import transitions
from tierq.config import BackendConfig, TierConfig, TierqConfig
from tierq.features import needs
from tierq.leases import Lease
from tierq.models import Backend, Job
from tierq.policy import (
    Decision,
    Degrade,
    Drop,
    Escalate,
    Fail,
    HandOver,
    Park,
    Retry,
    Snapshot,
)
from tierq.routes import Chain, Step
from worker import circuit, minimal
from worker.answers import completion
from worker.backends.base import ChatAnswer


@dataclass(frozen=True)
class Claimed:
    """A job this worker holds the lease of, on ``tier``."""

    lease: Lease
    job: Job
    tier: TierConfig
    original: dict[str, Any]  # the first step's request: the minimal tier's cache key
    chain: Chain  # the job's route

    @property
    def step(self) -> Step:
        return self.chain.step(self.tier.name)

    @property
    def first_step(self) -> bool:
        return self.chain.is_first(self.tier.name)


def snapshot(
    session: Session, config: TierqConfig, claimed: Claimed, backend: BackendConfig | None
) -> Snapshot:
    """What the policy needs, read now (after the call's outcome is recorded)."""
    tier, job = claimed.tier, claimed.job
    row = session.get(Backend, backend.name) if backend is not None else None
    larger = backend.larger_context if backend is not None else None
    return Snapshot(
        tier=tier.name,
        next_tier=claimed.chain.next_tier(tier.name, needs(claimed.original)),
        escalate_on=claimed.step.escalate_on,
        tier_backends=len(tier.backends),
        tries=job.tier_attempts + 1,
        retry=tier.retry,
        window_calls=row.window_calls if row else 0,
        window_retries=row.window_retries if row else 0,
        min_calls=config.breaker_for(backend.name).min_calls if backend else 0,
        seconds_left=transitions.seconds_left(session, job.id),
        on_exhausted=job.on_exhausted or config.on_exhausted,  # type: ignore[arg-type]
        larger_context=(config.tier_of(larger).name, larger) if larger else None,
        jitter=random.random(),
    )


def apply(
    session: Session,
    config: TierqConfig,
    claimed: Claimed,
    decision: Decision,
    backend: str | None = None,
) -> str | None:
    """Make the decision's transition, fenced by the lease; returns the queue to publish the
    job to after commit, if it is queued on a tier again."""
    lease, tier = claimed.lease, claimed.tier
    match decision:
        case Retry(delay=delay, reason=reason, counts_retry=counts):
            if transitions.retry_later(session, lease, delay, reason) and counts and backend:
                circuit.count_retry(session, backend)
        case Escalate(tier=to, reason=reason, pinned=pinned):
            if transitions.escalate(session, lease, tier.name, to, reason, pinned):
                return to  # a worker that lost the job publishes nothing: its owner decides
        case Degrade(reason=reason):
            found = minimal.answer(session, config.minimal, claimed.original, claimed.job.owner_id)
            if found is None:
                _park(session, config, claimed, reason)
            else:
                _minimal_answer(session, claimed, found)
        case Park(reason=reason):
            _park(session, config, claimed, reason)
        case Fail(reason=reason):
            transitions.fail(session, lease, reason)
        case HandOver(reason=reason):
            transitions.hand_over(session, lease, reason)
        case Drop():
            pass  # not ours any more; a cancelled job's slot is let go by the caller
        case _:
            assert_never(decision)
    return None


def _park(session: Session, config: TierqConfig, claimed: Claimed, reason: str) -> None:
    """Parked on its route's first step that can serve it: replayed from there."""
    emergency = config.emergency
    first = claimed.chain.first_tier(needs(claimed.original))
    transitions.park(
        session,
        claimed.lease,
        f"{emergency.message} ({reason})",
        first_tier=first if isinstance(first, str) else claimed.tier.name,
        retry_after=emergency.retry_after,
    )


def _minimal_answer(session: Session, claimed: Claimed, found: minimal.MinimalAnswer) -> None:
    answer = ChatAnswer(
        content=found.content,
        finish_reason="stop",
        prompt_tokens=0,
        completion_tokens=len(found.content.split()),
        model=f"tierq-{found.quality}",
    )
    result = completion(
        claimed.job,
        answer,
        tier="minimal",
        backend=found.source,
        quality=found.quality,
        notice=None,
    )
    transitions.succeed(
        session,
        claimed.lease,
        claimed.job,
        result,
        backend=found.source,
        model=answer.model,
        quality=found.quality,
    )
