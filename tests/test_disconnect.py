"""A chat-completions client that disconnects before its answer: its job is kept unless the
request (x-tierq-cancel-on-disconnect) or its key asks for it to be cancelled; then the
backend call is aborted too (the simulator sees the connection closed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from tests.deployment import Deployment, deployment
from tests.services import wait_until
from tierq.db import make_engine
from tierq.keys import create_key
from tierq.models import Job, Turn

pytestmark = pytest.mark.slow
HEADER = "x-tierq-cancel-on-disconnect"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("disconnect")) as running:
        running.stack.api()
        running.stack.relay()
        running.stack.worker("gpu")
        running.fault("gpu-sim", latency_ms=4000)
        yield running


def aborted(d: Deployment) -> int:
    return httpx.get(f"{d.simulators['gpu-sim']}/_sim/stats").json()["aborted"]


def new_key(d: Deployment, cancel_on_disconnect: bool) -> str:
    engine = make_engine(d.database_url)
    try:
        with Session(engine) as session, session.begin():
            created = create_key(session, "k", cancel_on_disconnect=cancel_on_disconnect)
            return created.key
    finally:
        engine.dispose()


def job_row(d: Deployment, marker: str) -> dict[str, object]:
    """The job whose user message is ``marker`` (the client hung up before learning its id)."""
    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(Job).join(Turn, Turn.conversation_id == Job.conversation_id)
                .where(Turn.content == marker)
            ).one()  # fmt: skip
    finally:
        engine.dispose()
    return dict(row._mapping)


def hang_up(d: Deployment, key: str, stream: bool, **headers: str) -> str:
    """Ask, and disconnect while the backend call is in flight; returns the marker."""
    marker = f"hang up {uuid.uuid4().hex}"
    body = {"model": "m", "messages": [{"role": "user", "content": marker}], "stream": stream}
    auth = {"Authorization": f"Bearer {key}", **headers}
    with httpx.Client(base_url=d.stack.api_url, headers=auth, timeout=30) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                wait_until(lambda: _calling(d, marker), 10, what="the call to start")
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up: connection closed
                client.post("/v1/chat/completions", json=body, timeout=1.5)
            assert _calling(d, marker)
    return marker


def _calling(d: Deployment, marker: str) -> bool:
    try:
        return job_row(d, marker)["calling_backend"] is not None
    except NoResultFound:  # not submitted yet
        return False


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_request_that_asks_for_it_cancels_its_job_and_aborts_the_call(
    d: Deployment, stream: bool
) -> None:
    before = aborted(d)
    marker = hang_up(d, d.key, stream, **{HEADER: "true"})
    wait_until(lambda: job_row(d, marker)["status"] == "cancelled", 5, what="the cancel")
    wait_until(lambda: aborted(d) > before, 3, what="the backend call aborted")
    job = job_row(d, marker)
    assert job["error"] == "cancelled: the client disconnected"
    wait_until(lambda: job_row(d, marker)["calling_backend"] is None, 3, what="slot freed")


def test_by_default_the_job_is_kept_and_answered(d: Deployment) -> None:
    before = aborted(d)
    marker = hang_up(d, d.key, stream=False)
    wait_until(lambda: job_row(d, marker)["status"] == "succeeded", 20, what="the answer")
    assert aborted(d) == before  # the call ran to its end


def test_a_keys_default_cancels_and_the_header_overrides_it(d: Deployment) -> None:
    key = new_key(d, cancel_on_disconnect=True)
    cancelled = hang_up(d, key, stream=True)
    kept = hang_up(d, key, stream=True, **{HEADER: "false"})
    wait_until(lambda: job_row(d, cancelled)["status"] == "cancelled", 5, what="the cancel")
    wait_until(lambda: job_row(d, kept)["status"] == "succeeded", 20, what="the answer")
