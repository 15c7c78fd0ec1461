"""What happens to a job whose call did not answer: the failure policy, as a pure function.

The worker calls ``decide(outcome, snapshot)`` and applies the ``Decision`` it returns
(``retry_wait``, queued on another tier, the minimal tier, parked, failed, handed back, or
nothing). Everything the decision needs is in the ``Snapshot`` the caller reads first,
including the random draw for the jitter and the seconds left before the deadline by the
database clock, so this module does no I/O, draws no random number and reads no clock: the
same outcome and snapshot always give the same decision, and a table of them tests it.

The rules (DESIGN.md, job lifecycle; the reasons are the texts users read in a job's error
and events):

- a request the backend refuses fails at once; one that does not fit its context moves to
  the backend configured with a larger one, if any;
- any other error is retried on the tier, with exponential backoff and full jitter, while
  the tier has tries left, the backend's retry budget allows it and the retry is due before
  the deadline; otherwise the tier is exhausted;
- a full tier (every backend at its concurrency cap) is busy, not dead: the job waits a
  moment on it, unless its deadline would pass first;
- an exhausted tier passes the job on to the next tier; after the last one the request's
  ``on_exhausted`` decides: the minimal tier, parking or failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import assert_never

from tierq.config import OnExhausted, RetryConfig
from tierq.errors import ErrorClass

# The shortest wait for a slot on a full tier; the relay's sweep interval rounds it up anyway.
FULL_TIER_MIN_DELAY = 0.1
# A hung or absent backend costs the client a full timeout per try.
UNREACHABLE = frozenset({ErrorClass.TIMEOUT, ErrorClass.CONNECT})


# -- outcomes: what happened ---------------------------------------------------------------
@dataclass(frozen=True)
class Failed:
    """A backend call failed; ``retry_after`` is the backend's advice in seconds."""

    error_class: ErrorClass
    message: str
    retry_after: float | None = None
    backend: str = ""

    def __post_init__(self) -> None:
        # Accept the class's value too ("timeout"), as BackendError does.
        object.__setattr__(self, "error_class", ErrorClass(self.error_class))

    def __str__(self) -> str:
        """BackendError's text, which the reasons quote after ``last:``."""
        return f"{self.error_class}: {self.message}"


@dataclass(frozen=True)
class TierFull:
    """Every backend of the tier that would take a call is at its concurrency cap."""

    backends: tuple[str, ...]


@dataclass(frozen=True)
class NoLiveBackend:
    """Nothing in the tier may take a call (open breakers, disabled, unhealthy)."""


@dataclass(frozen=True)
class Expired:
    """The job's deadline passed before its call was made."""


class StopReason(StrEnum):
    CANCELLED = "cancelled"  # the client cancelled the job
    LOST = "lost"  # this worker lost the job's lease: someone else owns it now
    RETIRED = "retired"  # an operator disabled the backend with --now
    SHUTDOWN = "shutdown"  # the worker is stopping


@dataclass(frozen=True)
class Stopped:
    """The call was aborted before it answered; ``backend`` is the one it was made to."""

    why: StopReason
    backend: str = ""


Outcome = Failed | TierFull | NoLiveBackend | Expired | Stopped


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """What the decision needs to know, read by the caller just before it decides.

    ``tries`` counts this tier's calls including the one that just failed;
    ``window_calls``/``window_retries``/``min_calls`` are the failed backend's breaker window
    (the retry budget); ``seconds_left`` is before the deadline by the database clock (None:
    no deadline; negative: passed); ``on_exhausted`` is the request's, else the config's;
    ``larger_context`` is the (tier, backend) configured for a request that does not fit the
    failed backend; ``jitter`` is a uniform draw in [0, 1), made by the caller.
    """

    tier: str
    next_tier: str | None  # None on the last model tier
    tier_backends: int  # backends configured in the tier
    tries: int
    retry: RetryConfig
    window_calls: int
    window_retries: int
    min_calls: int
    seconds_left: float | None
    on_exhausted: OnExhausted
    larger_context: tuple[str, str] | None = None
    # The failures that move a job on from this step of its route (the step's triggers).
    escalate_on: frozenset[ErrorClass] = frozenset(c for c in ErrorClass if c.retryable)
    jitter: float


# -- decisions: what to do -------------------------------------------------------------------
@dataclass(frozen=True)
class Retry:
    """Wait ``delay`` seconds in retry_wait on this tier (the relay wakes the job).

    ``counts_retry``: the caller counts it against the failed backend's retry budget (after a
    backend error; not for a full tier, where nothing was called).
    """

    delay: float
    reason: str
    counts_retry: bool


@dataclass(frozen=True)
class Escalate:
    """Queue the job on ``tier`` with a fresh count of tries, pinned to ``pinned`` if set."""

    tier: str
    reason: str
    pinned: str | None = None


@dataclass(frozen=True)
class Degrade:
    """No model tier is left: the minimal tier may answer (cache, rules, static message);
    with nothing to answer, the caller parks the job with this reason."""

    reason: str


@dataclass(frozen=True)
class Park:
    """Into the emergency queue, replayed when a tier is alive again."""

    reason: str


@dataclass(frozen=True)
class Fail:
    """The job ends failed with this reason."""

    reason: str


@dataclass(frozen=True)
class HandOver:
    """Back to queued on the same tier, not counted as a try or a crash."""

    reason: str


@dataclass(frozen=True)
class Drop:
    """Nothing to write: the job is not this worker's any more, or it was cancelled."""


Decision = Retry | Escalate | Degrade | Park | Fail | HandOver | Drop


def decide(outcome: Outcome, snapshot: Snapshot) -> Decision:
    """The next step for a job whose call did not answer."""
    match outcome:
        case Failed():
            return _failed(outcome, snapshot)
        case TierFull():
            return _tier_full(outcome, snapshot)
        case NoLiveBackend():
            return _exhausted(f"no live backend in tier {snapshot.tier}", snapshot)
        case Expired():
            return Fail("deadline passed before an answer")
        case Stopped():
            return _stopped(outcome, snapshot)
        case _:
            assert_never(outcome)


def _failed(failed: Failed, snapshot: Snapshot) -> Decision:
    """A request the backend refuses would be refused again anywhere: no retry. One that does
    not fit has one place to go. Anything else may pass if tried again."""
    match failed.error_class:
        case ErrorClass.CLIENT:
            return Fail(f"{failed.backend} refused the request: {failed.message}")
        case ErrorClass.CONTEXT_LENGTH:
            return _too_long(failed, snapshot)
        case _:
            return _retry_or_move_on(failed, snapshot)


def _too_long(failed: Failed, snapshot: Snapshot) -> Decision:
    """The conversation does not fit the backend: the backend with a larger context answers
    it (pinned, wherever its tier is), or nothing can."""
    if snapshot.larger_context is None:
        return Fail(
            f"the conversation does not fit {failed.backend}'s context and no backend "
            f"with a larger one is configured: {failed.message}"
        )
    tier, backend = snapshot.larger_context
    return Escalate(tier, "context too long", pinned=backend)


def _retry_or_move_on(failed: Failed, snapshot: Snapshot) -> Decision:
    """Retry on this tier, or give up on it: the next tier may answer sooner."""
    left = snapshot.seconds_left
    if left is not None and left <= 0:
        return Fail(f"deadline passed; last: {failed}")
    delay = backoff(snapshot.retry, snapshot.tries, failed.retry_after, snapshot.jitter)
    moves_on = failed.error_class in snapshot.escalate_on
    if delay is None:
        # Holding the job that long while other tiers may be alive is waiting on failure.
        return _exhausted(
            f"{failed.backend} asks to wait {failed.retry_after:g}s, longer than tier "
            f"{snapshot.tier}'s max_delay of {snapshot.retry.max_delay:g}s; last: {failed}",
            snapshot,
            moves_on,
        )
    if _may_retry(failed, snapshot, delay):
        return Retry(delay, str(failed), counts_retry=True)
    return _exhausted(
        f"tier {snapshot.tier} exhausted after {snapshot.tries} tries; last: {failed}",
        snapshot,
        moves_on,
    )


def _may_retry(failed: Failed, snapshot: Snapshot, delay: float) -> bool:
    """Every reason not to retry on this tier, each a reason to try the next one."""
    # A backend that hangs or is gone would cost the client another full timeout; with no
    # other backend in the tier to try, the next tier is the faster answer.
    alone_and_unreachable = failed.error_class in UNREACHABLE and snapshot.tier_backends == 1
    budget = retry_allowed(
        snapshot.window_calls, snapshot.window_retries, snapshot.retry.budget, snapshot.min_calls
    )
    return (
        not alone_and_unreachable
        and snapshot.tries < snapshot.retry.attempts
        and budget
        # A retry due after the deadline could only fail it: the next tier may not.
        and not _deadline_within(snapshot.seconds_left, delay)
    )


def _tier_full(full: TierFull, snapshot: Snapshot) -> Decision:
    """A full tier is not a dead one, and the tiers after it are smaller or cost money: the
    job waits a moment on this tier (no try used up: nothing was called) and moves on only
    if its deadline would pass first."""
    delay = full_tier_delay(snapshot.retry, snapshot.jitter)
    busy = ", ".join(full.backends)
    if _deadline_within(snapshot.seconds_left, delay):
        return _exhausted(
            f"tier {snapshot.tier} is full ({busy}) and the deadline is too near to wait",
            snapshot,
        )
    return Retry(delay, f"tier {snapshot.tier} is full: {busy} at their cap", counts_retry=False)


def _stopped(stopped: Stopped, snapshot: Snapshot) -> Decision:
    """An aborted call says nothing about the backend or the request.

    A retired backend's job is queued again on the same tier without using up a try: the
    tier's routing skips the disabled backend, and if none is left the next claim finds no
    live backend and escalates. A stopping worker hands its job back to the queue: it is not
    a crash, so it does not count towards the job's deliveries.
    """
    match stopped.why:
        case StopReason.CANCELLED | StopReason.LOST:
            return Drop()
        case StopReason.RETIRED:
            return Escalate(snapshot.tier, f"backend {stopped.backend} retired by an operator")
        case StopReason.SHUTDOWN:
            return HandOver("worker stopped")
        case _:
            assert_never(stopped.why)


def _exhausted(reason: str, snapshot: Snapshot, moves_on: bool = True) -> Decision:
    """This tier cannot answer: the next tier, or what the request accepts after the last
    (also when the failure is not one that moves a job on from this step of its route)."""
    if snapshot.next_tier is not None and moves_on:
        return Escalate(snapshot.next_tier, reason)
    match snapshot.on_exhausted:
        case "fail":
            return Fail(f"every tier failed; {reason}")
        case "degrade":
            return Degrade(reason)
        case _:
            return Park(reason)


def backoff(
    retry: RetryConfig, tries: int, retry_after: float | None, jitter: float
) -> float | None:
    """Exponential backoff with full jitter, capped at ``max_delay``; never sooner than the
    backend's ``Retry-After``. ``jitter`` is a uniform draw in [0, 1).

    None when the backend asks for a longer wait than ``max_delay``: holding the job that
    long while other tiers may be alive is waiting on failure, not routing around it.
    """
    if retry_after is not None and retry_after > retry.max_delay:
        return None
    ceiling = min(retry.max_delay, retry.base_delay * 2 ** max(tries - 1, 0))
    return max(jitter * ceiling, retry_after or 0.0)


def full_tier_delay(retry: RetryConfig, jitter: float) -> float:
    """How long a job waits for a free slot: short, jittered so that the jobs waiting on one
    tier do not all come back at once, never above the tier's ``max_delay``."""
    base = max(retry.base_delay, FULL_TIER_MIN_DELAY)
    return min(base + base * jitter, max(retry.max_delay, FULL_TIER_MIN_DELAY))


def retry_allowed(window_calls: int, window_retries: int, budget: float, min_calls: int) -> bool:
    """Retries stay under ``budget`` of the backend's calls in the current window; below
    the breaker's ``min_calls`` the window says too little to refuse one."""
    calls = max(window_calls, 1)
    return (window_retries + 1) / calls <= budget or window_calls < min_calls


def _deadline_within(seconds_left: float | None, seconds: float) -> bool:
    """Will the deadline have passed ``seconds`` from now?"""
    return seconds_left is not None and seconds_left < seconds
