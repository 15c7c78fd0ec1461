"""Readiness follows the database and the broker: 503 naming the failing check while one
is down, 200 again once it is back."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.deployment import deployment
from tests.services import wait_until

pytestmark = pytest.mark.slow


def test_ready_turns_503_when_postgres_or_broker_stops(tmp_path: Path) -> None:
    with deployment(tmp_path, "throwaway-postgres") as d:
        assert d.postgres is not None and d.redis is not None
        d.stack.api()
        ready = f"{d.stack.api_url}/health/ready"

        def status() -> tuple[int, dict]:
            response = httpx.get(ready, timeout=15)
            return response.status_code, response.json()

        assert status()[0] == 200
        d.redis.stop()
        code, body = status()
        assert code == 503 and body["checks"]["database"] == "ok"
        assert body["checks"]["broker"].startswith("fail")
        assert httpx.get(f"{d.stack.api_url}/health/live").status_code == 200
        d.redis.start()
        wait_until(lambda: status()[0] == 200, 20, 0.5, what="ready after redis")
        d.postgres.stop()
        code, body = status()
        assert code == 503 and body["checks"]["database"].startswith("fail")
        d.postgres.start()
        wait_until(lambda: status()[0] == 200, 30, 0.5, what="ready after postgres")
