"""A small client for a simulator's admin API, for drills, benchmarks and tests."""

from __future__ import annotations

from typing import Any

import httpx


class SimulatorControl:
    """Switch the faults of the instance at ``base_url`` and read its counters."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SimulatorControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_sim/state")

    def set_faults(self, **settings: Any) -> dict[str, Any]:
        """Replace all fault settings; those not given go back to their defaults."""
        return self._call("PUT", "/_sim/faults", settings)

    def patch_faults(self, **changes: Any) -> dict[str, Any]:
        """Change only the settings given."""
        return self._call("PATCH", "/_sim/faults", changes)

    def reset(self) -> dict[str, Any]:
        """Initial faults again, counters zeroed."""
        return self._call("POST", "/_sim/reset")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_sim/stats")

    def reset_stats(self) -> dict[str, Any]:
        """Counters and request log zeroed; the faults stay as they are."""
        return self._call("POST", "/_sim/stats/reset")

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """The latest requests received, oldest first, optionally only one endpoint's."""
        log = self._call("GET", "/_sim/requests")["requests"]
        return [r for r in log if endpoint is None or r["endpoint"] == endpoint]

    def received(self, endpoint: str | None = None) -> int:
        """Requests received in total, or on one endpoint such as ``POST /v1/messages``."""
        stats = self.stats()
        return stats["total"] if endpoint is None else stats["endpoints"].get(endpoint, 0)
