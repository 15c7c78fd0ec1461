"""The retry budget honours the breaker's configured min_calls."""

from __future__ import annotations

from tierq.models import Backend
from worker.circuit import retry_allowed


def window(calls: int, retries: int) -> Backend:
    return Backend(name="b", tier="t", window_calls=calls, window_retries=retries)


def test_retry_budget_exempts_a_window_below_the_configured_min_calls() -> None:
    busy = window(calls=8, retries=4)  # a retry would make 5/8, over a 20 % budget
    assert retry_allowed(busy, 0.2, min_calls=10), "8 calls say too little with min_calls 10"
    assert not retry_allowed(busy, 0.2, min_calls=8)


def test_retry_budget_applies_once_the_window_has_min_calls() -> None:
    assert not retry_allowed(window(calls=3, retries=1), 0.2, min_calls=2)
    assert retry_allowed(window(calls=10, retries=1), 0.2, min_calls=2)
