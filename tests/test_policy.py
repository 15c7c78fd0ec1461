"""The failure policy, table by table: every row says what happened, what the worker knew and
the decision the rules (tierq.policy's docstring, DESIGN.md's job lifecycle) call for.

Expected decisions are written from the rules here, never by calling ``decide``; each is a
whole decision, so a row checks its type and every field (tier, delay, reason text).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from typing import Any

import pytest

from tierq.config import RetryConfig
from tierq.errors import ErrorClass
from tierq.policy import (
    Decision,
    Degrade,
    Drop,
    Escalate,
    Expired,
    Fail,
    Failed,
    HandOver,
    NoLiveBackend,
    Outcome,
    Park,
    Retry,
    Snapshot,
    Stopped,
    StopReason,
    TierFull,
    backoff,
    decide,
    full_tier_delay,
    retry_allowed,
)

# Three tries a tier, 1 s doubling up to 8 s, retries at most 20 % of a backend's calls.
RETRY = RetryConfig(attempts=3, base_delay=1.0, max_delay=8.0, budget=0.2)
JITTER = 0.5
FIRST_DELAY = JITTER * 1.0  # full jitter under the first ceiling, base_delay * 2**0
FULL_DELAY = 1.0 + 1.0 * JITTER  # a full tier waits base_delay * (1 + jitter)
MIN_CALLS = 5

POSITIONS = {"first": ("gpu", "cpu"), "middle": ("cpu", "hosted"), "last": ("hosted", None)}
BUDGETS = {"allowed": (10, 1), "spent": (10, 2)}  # (window calls, retries): 2/10, 3/10
DEADLINES = {"none": None, "ample": 100.0, "near": 0.25, "passed": -1.0}
ON_EXHAUSTED = ("park", "fail", "degrade")
RETRYABLE = [c for c in ErrorClass if c not in (ErrorClass.CLIENT, ErrorClass.CONTEXT_LENGTH)]
UNREACHABLE = (ErrorClass.TIMEOUT, ErrorClass.CONNECT)


def snap(**changes: Any) -> Snapshot:
    """The first tier, first try, budget allowed, no deadline, unless a row says otherwise."""
    fields: dict[str, Any] = {
        "tier": "gpu",
        "next_tier": "cpu",
        "tier_backends": 2,
        "tries": 1,
        "retry": RETRY,
        "window_calls": 10,
        "window_retries": 1,
        "min_calls": MIN_CALLS,
        "seconds_left": None,
        "on_exhausted": "park",
        "larger_context": None,
        "jitter": JITTER,
    }
    return Snapshot(**(fields | changes))


def at(position: str, **changes: Any) -> Snapshot:
    tier, next_tier = POSITIONS[position]
    return snap(tier=tier, next_tier=next_tier, **changes)


def failed(error_class: ErrorClass, tier: str = "gpu", **changes: Any) -> Failed:
    return Failed(error_class, f"{tier}-a: HTTP 500: boom", backend=f"{tier}-a", **changes)


def last_error(error_class: ErrorClass, tier: str = "gpu") -> str:
    """BackendError's text, as the reasons quote it."""
    return f"{error_class}: {tier}-a: HTTP 500: boom"


def gives_up(reason: str, position: str, on_exhausted: str) -> Decision:
    """The rule for an exhausted tier: the next one; after the last, the request's choice."""
    next_tier = POSITIONS[position][1]
    if next_tier is not None:
        return Escalate(next_tier, reason)
    return {
        "fail": Fail(f"every tier failed; {reason}"),
        "degrade": Degrade(reason),
        "park": Park(reason),
    }[on_exhausted]


def check(outcome: Outcome, snapshot: Snapshot, expected: Decision) -> None:
    decision = decide(outcome, snapshot)
    assert type(decision) is type(expected), f"{decision!r}, expected {expected!r}"
    assert decision == expected


# -- a retryable error: every class, tier position, budget, deadline and on_exhausted ----------
def retryable_rows() -> Iterator[Any]:
    for cls, position, budget, deadline, policy, backends in product(
        RETRYABLE, POSITIONS, BUDGETS, DEADLINES, ON_EXHAUSTED, (1, 2)
    ):
        tier = POSITIONS[position][0]
        calls, retries = BUDGETS[budget]
        snapshot = at(
            position,
            window_calls=calls,
            window_retries=retries,
            seconds_left=DEADLINES[deadline],
            on_exhausted=policy,
            tier_backends=backends,
        )
        last = last_error(cls, tier)
        expected: Decision
        if deadline == "passed":
            expected = Fail(f"deadline passed; last: {last}")
        elif (
            (cls in UNREACHABLE and backends == 1)  # alone and unreachable: move on
            or budget == "spent"
            or deadline == "near"  # 0.25 s left, the retry is due in 0.5 s
        ):
            reason = f"tier {tier} exhausted after 1 tries; last: {last}"
            expected = gives_up(reason, position, policy)
        else:
            expected = Retry(FIRST_DELAY, last, counts_retry=True)
        row_id = f"{cls}-{position}-budget_{budget}-deadline_{deadline}-{policy}-{backends}b"
        yield pytest.param(failed(cls, tier), snapshot, expected, id=row_id)


@pytest.mark.parametrize(("outcome", "snapshot", "expected"), list(retryable_rows()))
def test_retryable_error(outcome: Outcome, snapshot: Snapshot, expected: Decision) -> None:
    check(outcome, snapshot, expected)


# -- errors no retry can fix: a refused request, a conversation too long ------------------------
def refused_rows() -> Iterator[Any]:
    """Refused: fails at once, wherever the job is and whatever time it has left."""
    for position, deadline, policy in product(POSITIONS, DEADLINES, ON_EXHAUSTED):
        tier = POSITIONS[position][0]
        snapshot = at(position, seconds_left=DEADLINES[deadline], on_exhausted=policy)
        expected = Fail(f"{tier}-a refused the request: {tier}-a: HTTP 500: boom")
        row_id = f"client-{position}-deadline_{deadline}-{policy}"
        yield pytest.param(failed(ErrorClass.CLIENT, tier), snapshot, expected, id=row_id)


def too_long_rows() -> Iterator[Any]:
    """Too long: to the larger-context backend, pinned, in its own tier; else it fails."""
    larger = {"none": None, "later": ("hosted", "hosted-big"), "same": ("gpu", "gpu-big")}
    for route, position, deadline, policy, budget in product(
        larger, POSITIONS, DEADLINES, ON_EXHAUSTED, BUDGETS
    ):
        tier = POSITIONS[position][0]
        calls, retries = BUDGETS[budget]
        snapshot = at(
            position,
            seconds_left=DEADLINES[deadline],
            on_exhausted=policy,
            larger_context=larger[route],
            window_calls=calls,
            window_retries=retries,
            tries=RETRY.attempts,  # no try left on the tier: irrelevant to the route
        )
        expected: Decision
        if (target := larger[route]) is None:
            expected = Fail(
                f"the conversation does not fit {tier}-a's context and no backend with a "
                f"larger one is configured: {tier}-a: HTTP 500: boom"
            )
        else:
            expected = Escalate(target[0], "context too long", pinned=target[1])
        row_id = f"context_length-larger_{route}-{position}-deadline_{deadline}-{policy}-{budget}"
        yield pytest.param(failed(ErrorClass.CONTEXT_LENGTH, tier), snapshot, expected, id=row_id)


@pytest.mark.parametrize(("outcome", "snapshot", "expected"), [*refused_rows(), *too_long_rows()])
def test_error_no_retry_fixes(outcome: Outcome, snapshot: Snapshot, expected: Decision) -> None:
    check(outcome, snapshot, expected)


# -- no call made: a full tier, no live backend, a deadline already passed ------------------------
def no_call_rows() -> Iterator[Any]:
    busy = TierFull(("gpu-a", "gpu-b"))
    for position, deadline, policy in product(POSITIONS, DEADLINES, ON_EXHAUSTED):
        tier = POSITIONS[position][0]
        snapshot = at(position, seconds_left=DEADLINES[deadline], on_exhausted=policy)
        suffix = f"{position}-deadline_{deadline}-{policy}"
        # A full tier: wait FULL_DELAY on it unless the deadline comes first (near, passed).
        full: Decision
        if deadline in ("near", "passed"):
            reason = f"tier {tier} is full (gpu-a, gpu-b) and the deadline is too near to wait"
            full = gives_up(reason, position, policy)
        else:
            full = Retry(FULL_DELAY, f"tier {tier} is full: gpu-a, gpu-b at their cap", False)
        yield pytest.param(busy, snapshot, full, id=f"full-{suffix}")
        dead = gives_up(f"no live backend in tier {tier}", position, policy)
        yield pytest.param(NoLiveBackend(), snapshot, dead, id=f"no_live-{suffix}")
        expired = Fail("deadline passed before an answer")
        yield pytest.param(Expired(), snapshot, expired, id=f"expired-{suffix}")


@pytest.mark.parametrize(("outcome", "snapshot", "expected"), list(no_call_rows()))
def test_no_call_made(outcome: Outcome, snapshot: Snapshot, expected: Decision) -> None:
    check(outcome, snapshot, expected)


# -- stopped calls ----------------------------------------------------------------------------
def stopped_rows() -> Iterator[Any]:
    for why, position in product(StopReason, POSITIONS):
        tier = POSITIONS[position][0]
        expected = {
            StopReason.CANCELLED: Drop(),
            StopReason.LOST: Drop(),
            # The same tier, not pinned: its routing skips the disabled backend.
            StopReason.RETIRED: Escalate(tier, f"backend {tier}-a retired by an operator"),
            StopReason.SHUTDOWN: HandOver("worker stopped"),
        }[why]
        # No try left, budget spent, deadline passed: nothing of it matters to an aborted call.
        snapshot = at(position, tries=RETRY.attempts, window_retries=5, seconds_left=-1.0)
        yield pytest.param(
            Stopped(why, backend=f"{tier}-a"), snapshot, expected, id=f"{why}-{position}"
        )


@pytest.mark.parametrize(("outcome", "snapshot", "expected"), list(stopped_rows()))
def test_stopped(outcome: Outcome, snapshot: Snapshot, expected: Decision) -> None:
    check(outcome, snapshot, expected)


# -- Retry-After -----------------------------------------------------------------------------
RATE_LIMITED = ErrorClass.RATE_LIMITED
ASKS_TOO_MUCH = (
    "gpu-a asks to wait 9s, longer than tier gpu's max_delay of 8s; "
    f"last: {last_error(RATE_LIMITED)}"
)
RETRY_AFTER = [
    # (retry_after, snapshot changes, expected)
    (9.0, {}, Escalate("cpu", ASKS_TOO_MUCH)),
    (9.0, {"next_tier": None, "on_exhausted": "fail"}, Fail(f"every tier failed; {ASKS_TOO_MUCH}")),
    (9.0, {"next_tier": None, "on_exhausted": "park"}, Park(ASKS_TOO_MUCH)),
    (9.0, {"next_tier": None, "on_exhausted": "degrade"}, Degrade(ASKS_TOO_MUCH)),
    # Checked before the tries, the budget and the deadline's nearness; after its passing.
    (9.0, {"tries": 3, "window_retries": 5, "seconds_left": 0.1}, Escalate("cpu", ASKS_TOO_MUCH)),
    (9.0, {"seconds_left": -1.0}, Fail(f"deadline passed; last: {last_error(RATE_LIMITED)}")),
    # At most max_delay: waited for, never sooner than asked, never sooner than the backoff.
    (8.0, {}, Retry(8.0, last_error(RATE_LIMITED), True)),
    (3.0, {}, Retry(3.0, last_error(RATE_LIMITED), True)),
    (0.2, {}, Retry(FIRST_DELAY, last_error(RATE_LIMITED), True)),
    (0.0, {}, Retry(FIRST_DELAY, last_error(RATE_LIMITED), True)),
    # The asked-for wait outlives the deadline: the next tier.
    (
        3.0,
        {"seconds_left": 2.0},
        Escalate("cpu", f"tier gpu exhausted after 1 tries; last: {last_error(RATE_LIMITED)}"),
    ),
]


@pytest.mark.parametrize(
    ("retry_after", "changes", "expected"),
    [pytest.param(*row, id=f"retry_after_{row[0]:g}-{i}") for i, row in enumerate(RETRY_AFTER)],
)
def test_retry_after(retry_after: float, changes: dict[str, Any], expected: Decision) -> None:
    check(failed(RATE_LIMITED, retry_after=retry_after), snap(**changes), expected)


# -- tries, the single unreachable backend, the budget's window, the deadline's edge ------------
def exhausted_after(tries: int, cls: ErrorClass = ErrorClass.SERVER) -> Escalate:
    return Escalate("cpu", f"tier gpu exhausted after {tries} tries; last: {last_error(cls)}")


def retry(delay: float, cls: ErrorClass = ErrorClass.SERVER) -> Retry:
    return Retry(delay, last_error(cls), counts_retry=True)


SERVER = ErrorClass.SERVER
LONG = RetryConfig(attempts=20, base_delay=1.0, max_delay=8.0, budget=0.2)
ONE = RetryConfig(attempts=1, base_delay=1.0, max_delay=8.0, budget=0.2)
RULES = [
    # tries against attempts (3); the ceiling doubles per try, up to max_delay
    ("try_1_of_3", SERVER, {"tries": 1}, retry(0.5)),
    ("try_2_of_3", SERVER, {"tries": 2}, retry(1.0)),
    ("try_3_of_3", SERVER, {"tries": 3}, exhausted_after(3)),
    ("try_4_of_3", SERVER, {"tries": 4}, exhausted_after(4)),
    ("try_1_of_1", SERVER, {"tries": 1, "retry": ONE}, exhausted_after(1)),
    ("try_4_of_20", SERVER, {"tries": 4, "retry": LONG}, retry(4.0)),
    ("try_10_of_20_capped", SERVER, {"tries": 10, "retry": LONG}, retry(4.0)),
    ("jitter_0", SERVER, {"jitter": 0.0}, retry(0.0)),
    # a lone backend that hangs or is gone is not waited on; one that answers badly is
    *[
        (
            f"{cls}-{n}_backends",
            cls,
            {"tier_backends": n},
            exhausted_after(1, cls) if cls in UNREACHABLE and n == 1 else retry(0.5, cls),
        )
        for cls, n in product(RETRYABLE, (1, 2, 3))
    ],
    # the budget: (retries + 1) / calls <= 20 %, or fewer calls than min_calls in the window
    ("budget_exactly_met", SERVER, {"window_calls": 10, "window_retries": 1}, retry(0.5)),
    ("budget_over", SERVER, {"window_calls": 10, "window_retries": 2}, exhausted_after(1)),
    ("budget_below_min_calls", SERVER, {"window_calls": 4, "window_retries": 4}, retry(0.5)),
    ("budget_at_min_calls", SERVER, {"window_calls": 5, "window_retries": 1}, exhausted_after(1)),
    ("budget_empty_window", SERVER, {"window_calls": 0, "window_retries": 0}, retry(0.5)),
    # the deadline: passed at 0 s left; a retry due exactly at it is still made
    (
        "deadline_now",
        SERVER,
        {"seconds_left": 0.0},
        Fail(f"deadline passed; last: {last_error(SERVER)}"),
    ),
    ("deadline_at_retry", SERVER, {"seconds_left": 0.5}, retry(0.5)),
    ("deadline_just_before_retry", SERVER, {"seconds_left": 0.49}, exhausted_after(1)),
]


@pytest.mark.parametrize(
    ("error_class", "changes", "expected"),
    [pytest.param(cls, c, e, id=name) for name, cls, c, e in RULES],
)
def test_retry_rules(error_class: ErrorClass, changes: dict[str, Any], expected: Decision) -> None:
    check(failed(error_class), snap(**changes), expected)


FULL = TierFull(("gpu-a",))
FULL_REASON = "tier gpu is full: gpu-a at their cap"
TOO_NEAR = "tier gpu is full (gpu-a) and the deadline is too near to wait"
FULL_TIER = [
    # No try is used and no budget spent: a full tier waits whatever they say.
    ("no_try_left", {"tries": 3, "window_retries": 5}, Retry(FULL_DELAY, FULL_REASON, False)),
    ("lone_backend", {"tier_backends": 1}, Retry(FULL_DELAY, FULL_REASON, False)),
    ("deadline_at_wait", {"seconds_left": FULL_DELAY}, Retry(FULL_DELAY, FULL_REASON, False)),
    ("deadline_before_wait", {"seconds_left": 1.4}, Escalate("cpu", TOO_NEAR)),
    ("jitter_0", {"jitter": 0.0}, Retry(1.0, FULL_REASON, False)),
    (
        "short_delays",
        {"retry": RetryConfig(base_delay=0.0, max_delay=0.0)},
        Retry(0.1, FULL_REASON, False),  # never below FULL_TIER_MIN_DELAY
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"), [pytest.param(c, e, id=name) for name, c, e in FULL_TIER]
)
def test_full_tier_rules(changes: dict[str, Any], expected: Decision) -> None:
    check(FULL, snap(**changes), expected)


# -- the helpers the worker and the breaker share ----------------------------------------------
BACKOFF = [
    # (tries, retry_after, jitter, expected): jitter * min(8, 1 * 2**(tries-1)), >= Retry-After
    (1, None, 0.0, 0.0),
    (1, None, 0.5, 0.5),
    (1, None, 0.999, 0.999),
    (0, None, 0.5, 0.5),
    (2, None, 0.5, 1.0),
    (3, None, 0.5, 2.0),
    (4, None, 0.999, 7.992),
    (5, None, 0.5, 4.0),
    (50, None, 0.999, 7.992),
    (1, 0.0, 0.5, 0.5),
    (1, 3.0, 0.5, 3.0),
    (4, 3.0, 0.5, 4.0),
    (1, 8.0, 0.5, 8.0),
    (1, 8.001, 0.5, None),
    (1, 1000.0, 0.0, None),
]


@pytest.mark.parametrize(("tries", "retry_after", "jitter", "expected"), BACKOFF)
def test_backoff(
    tries: int, retry_after: float | None, jitter: float, expected: float | None
) -> None:
    delay = backoff(RETRY, tries, retry_after, jitter)
    assert delay == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("tries", "retry_after", "jitter"),
    list(product(range(1, 8), (None, 0.0, 2.5, 8.0), (0.0, 0.25, 0.5, 0.75, 0.999))),
)
def test_backoff_bounds(tries: int, retry_after: float | None, jitter: float) -> None:
    """Never sooner than Retry-After, never past the doubling ceiling (or Retry-After)."""
    ceiling = min(RETRY.max_delay, RETRY.base_delay * 2 ** (tries - 1))
    delay = backoff(RETRY, tries, retry_after, jitter)
    assert delay is not None
    assert (retry_after or 0.0) <= delay <= max(ceiling, retry_after or 0.0) <= RETRY.max_delay


FULL_TIER_DELAY = [
    # (base_delay, max_delay, jitter, expected): base * (1 + jitter), base >= 0.1, capped
    (1.0, 8.0, 0.0, 1.0),
    (1.0, 8.0, 0.5, 1.5),
    (1.0, 8.0, 0.999, 1.999),
    (0.0, 8.0, 0.5, 0.15),
    (0.05, 0.05, 0.5, 0.1),
    (0.0, 0.0, 0.999, 0.1),
    (5.0, 6.0, 0.5, 6.0),
    (5.0, 6.0, 0.1, 5.5),
]


@pytest.mark.parametrize(("base_delay", "max_delay", "jitter", "expected"), FULL_TIER_DELAY)
def test_full_tier_delay(
    base_delay: float, max_delay: float, jitter: float, expected: float
) -> None:
    config = RetryConfig(base_delay=base_delay, max_delay=max_delay)
    assert full_tier_delay(config, jitter) == pytest.approx(expected)


RETRY_ALLOWED = [
    # (window_calls, window_retries, budget, min_calls, allowed): (retries+1)/calls <= budget
    # or calls < min_calls
    (0, 0, 0.2, 5, True),
    (4, 4, 0.2, 5, True),
    (5, 0, 0.2, 5, True),
    (5, 1, 0.2, 5, False),
    (10, 1, 0.2, 5, True),
    (10, 2, 0.2, 5, False),
    (8, 4, 0.2, 10, True),
    (8, 4, 0.2, 8, False),
    (3, 1, 0.2, 2, False),
    (10, 1, 0.2, 2, True),
    (10, 0, 0.0, 5, False),
    (0, 0, 0.0, 1, True),
    (10, 9, 1.0, 5, True),
    (10, 10, 1.0, 5, False),
]


@pytest.mark.parametrize(("calls", "retries", "budget", "min_calls", "allowed"), RETRY_ALLOWED)
def test_retry_allowed(
    calls: int, retries: int, budget: float, min_calls: int, allowed: bool
) -> None:
    assert retry_allowed(calls, retries, budget, min_calls) is allowed


def test_failed_reads_like_a_backend_error() -> None:
    """The reasons quote the error as BackendError prints it; the class may come as text."""
    error = Failed("timeout", "gpu-a: read timeout after 60s", backend="gpu-a")  # type: ignore[arg-type]
    assert error.error_class is ErrorClass.TIMEOUT
    assert str(error) == "timeout: gpu-a: read timeout after 60s"
