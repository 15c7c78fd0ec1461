"""What a health probe sends to a backend this round, and what its result means: pure
decisions (the I/O is in ``worker.health``).

Probing must never harm the server it watches. Live calls are the first health signal: a
backend that answered a call within its probe interval is alive. A canary (a tiny real
inference) takes an inference slot, and on a single-slot server such as llama.cpp it queues
behind the real calls; so it goes only to a backend that is idle (it costs nothing there)
or suspected (the breaker is not closed, the last probe found it down, calls failed in the
breaker's window). A backend with calls in flight gets nothing at all: its calls are the
signal, and llama.cpp ends the stream it is generating when any other request arrives.
Everyone else gets the model list only: it takes no inference slot, and it is how a probe
checks that the configured model is served.

A timeout or an overload while calls are in flight says the backend is busy, not down: it
never counts against the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tierq.config import BackendConfig
from tierq.errors import ErrorClass
from tierq.models import Circuit, Health

# What a busy server answers a probe queued behind its calls (or shed because of them).
BUSY_ANSWERS = frozenset({ErrorClass.TIMEOUT, ErrorClass.OVERLOADED, ErrorClass.RATE_LIMITED})


class Send(StrEnum):
    NOTHING = "nothing"  # its calls in flight are the probe
    MODELS = "models"  # the model list only: cheap, answered without an inference slot
    CANARY = "canary"  # the model list, then a tiny real inference


@dataclass(frozen=True)
class BackendState:
    """What the database says of a backend when a probe starts (or ends)."""

    in_flight: int = 0  # calls in flight under live leases, every worker's
    answered_ago: float | None = None  # seconds since its last answered call; None: never
    health: str = Health.UNKNOWN
    circuit: str = Circuit.CLOSED
    recent_failures: int = 0  # failed calls in the breaker's current window


@dataclass(frozen=True)
class ProbePlan:
    send: Send
    reason: str  # for the log: why this much and no more


@dataclass(frozen=True)
class Verdict:
    health: str | None  # None: the probe proved nothing, the backend's health stays
    error: str | None


@dataclass(frozen=True)
class ProbeResult:
    """A probe's verdict and what it learned of the models, as saved on the backend's row."""

    backend: str
    health: str | None  # None: the probe proved nothing (busy), the health stays
    latency_ms: float
    error: str | None
    sent: Send = Send.CANARY
    listed: bool = False  # served_models and model_error are known: save them
    served_models: list[str] | None = None
    model_error: str | None = None


def suspicion(state: BackendState) -> str | None:
    """Why the backend is suspected, or None. Unknown (never probed) is not suspicious."""
    if state.circuit != Circuit.CLOSED:
        return f"breaker {state.circuit}"
    if state.health == Health.DOWN:
        return "the last probe found it down"
    if state.recent_failures:
        return f"{state.recent_failures} failed calls in the breaker's window"
    return None


def answered_recently(backend: BackendConfig, state: BackendState) -> bool:
    return state.answered_ago is not None and state.answered_ago <= backend.health.interval


def probe_plan(backend: BackendConfig, state: BackendState) -> ProbePlan:
    """How much to send to ``backend`` this round."""
    if state.in_flight:
        # Its calls say how it is (their failures feed the breaker), and llama.cpp ends the
        # stream it is generating when any other request arrives, a model list included.
        return ProbePlan(Send.NOTHING, f"busy: its {state.in_flight} calls in flight tell")
    if not backend.canary:
        return ProbePlan(Send.MODELS, "no canary for this backend (paid, or turned off)")
    suspected = suspicion(state)
    if suspected is not None:
        return ProbePlan(Send.CANARY, f"suspected: {suspected}")
    if answered_recently(backend, state):
        # Alive by its own answers. The model list still goes, cheap: without it a backend
        # that is always answering would never have its model checked.
        return ProbePlan(Send.MODELS, f"answered a call {state.answered_ago:.1f}s ago")
    return ProbePlan(Send.CANARY, "idle")


def busy_during(before: BackendState, after: BackendState, probe_seconds: float) -> int:
    """Calls the probe competed with: in flight when it started or when it ended, or
    answered while it ran (a call can start and end within a slow probe)."""
    answered_meanwhile = after.answered_ago is not None and after.answered_ago <= probe_seconds
    return max(before.in_flight, after.in_flight, int(answered_meanwhile))


def verdict(
    backend: BackendConfig,
    plan: ProbePlan,
    previous: str,
    latency_ms: float,
    failure: tuple[ErrorClass, str] | None,
    busy: int,
) -> Verdict:
    """What the probe's result says of the backend's health. ``previous`` is the health
    before it; ``busy`` the calls it competed with."""
    if failure is not None:
        error_class, message = failure
        if busy and error_class in BUSY_ANSWERS:
            return Verdict(None, f"not counted ({busy} in flight): {message}")
        return Verdict(Health.DOWN, message)
    if plan.send is Send.MODELS and backend.canary and previous == Health.DEGRADED:
        # Only a canary measures inference; a quick model list does not clear a slow canary.
        return Verdict(Health.DEGRADED, None)
    slow = latency_ms > backend.health.degraded_latency_ms
    return Verdict(Health.DEGRADED if slow else Health.HEALTHY, None)
