"""Run simulated backends: several named instances in one process, or one in a thread.

``serve_forever([("gpu-vllm", 9101), ("cpu-ollama", 9102)])`` serves every instance from
one asyncio loop until SIGINT or SIGTERM; ``start_in_thread("gpu-vllm")`` serves one on a
free loopback port in the background (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import uvicorn

from simulator.app import SimulatorApp, build_app
from simulator.faults import FaultSettings

__all__ = ["RunningSimulator", "bind", "build_app", "serve_forever", "start_in_thread"]

log = logging.getLogger("simulator")

# Seconds a stopping server waits for open requests; a hung request would wait forever.
GRACEFUL_SHUTDOWN = 1


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its runner, so several can share a loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(app: SimulatorApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, bound now so a busy port fails before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn[standard] brings it): lower overhead per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve_forever(
    specs: list[tuple[str, int]],
    host: str = "127.0.0.1",
    *,
    faults: Mapping[str, FaultSettings] | None = None,
) -> None:
    """Serve the named instances until SIGINT/SIGTERM (a second SIGINT stops at once).

    Each instance's initial faults come from ``faults[name]``, else from the environment
    (``TIERQ_SIM_FAULTS`` and ``TIERQ_SIM_FAULTS__<NAME>``).
    """
    faults = faults or {}
    sockets = [bind(host, port) for _, port in specs]
    servers = [
        _Server(_config(build_app(name, faults.get(name)), host, port)) for name, port in specs
    ]

    def stop(sig: signal.Signals) -> None:
        for server in servers:
            server.force_exit = server.should_exit and sig == signal.SIGINT
            server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        for name, port in specs:
            log.info("simulated backend %s on http://%s:%d", name, host, port)
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, sockets, strict=True)))

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


@dataclass
class RunningSimulator:
    """An instance served from a background thread; ``app`` gives direct access to state."""

    name: str
    url: str
    app: SimulatorApp
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    name: str,
    faults: FaultSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 5.0,
) -> RunningSimulator:
    """Serve one instance from a daemon thread (port 0: a free one); returns once it answers.

    Unlike ``build_app``, no faults means none at all: the environment is not read, so a
    stray ``TIERQ_SIM_FAULTS`` cannot change what a test sees.
    """
    sock = bind(host, port)
    port = sock.getsockname()[1]
    app = build_app(name, faults or FaultSettings())
    server = _Server(_config(app, host, port))

    def run() -> None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, name=f"simulator-{name}", daemon=True)
    thread.start()
    url_host = f"[{host}]" if ":" in host else host
    running = RunningSimulator(name, f"http://{url_host}:{port}", app, server, thread)
    try:
        _wait_until_answering(host, port, thread, timeout)
    except BaseException:
        running.stop()
        raise
    return running


def _wait_until_answering(host: str, port: int, thread: threading.Thread, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not thread.is_alive():
            raise RuntimeError("the simulator thread stopped during startup")
        connection = http.client.HTTPConnection(host, port, timeout=1)
        try:
            connection.request("GET", "/_sim/state")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the simulator on {host}:{port} did not answer in {timeout}s")
        time.sleep(0.01)
