"""Run real simulated backends on free loopback ports, for any test that needs one.

    with running_simulator("gpu-vllm") as url:
        SimulatorControl(url).set_faults(mode="overloaded", count=2)
        ...

The simulator is the real server (uvicorn on a socket), not a mock; each instance runs in
its own daemon thread with its own event loop and is stopped when the block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from simulator.faults import FaultSettings
from simulator.server import RunningSimulator, start_in_thread


@contextmanager
def running_simulator_handle(
    name: str, faults: FaultSettings | None = None
) -> Iterator[RunningSimulator]:
    """Like ``running_simulator``, but yields the handle (``.url``, ``.app`` for its state)."""
    running = start_in_thread(name, faults)
    try:
        yield running
    finally:
        running.stop()


@contextmanager
def running_simulator(name: str, faults: FaultSettings | None = None) -> Iterator[str]:
    """A simulated backend named ``name`` on a free port; yields its base URL (no /v1)."""
    with running_simulator_handle(name, faults) as running:
        yield running.url


@contextmanager
def running_simulators(*names: str) -> Iterator[dict[str, str]]:
    """Several instances at once; yields ``{name: base_url}``."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(running_simulator(name)) for name in names}
