"""Live job events over SSE: a client that disconnects and reconnects with Last-Event-ID
sees every event exactly once."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.deployment import Deployment, deployment
from tierq.db import make_engine
from tierq.models import TERMINAL_STATUSES, JobEvent

pytestmark = pytest.mark.slow


def read_events(d: Deployment, job_id: str, last_id: str | None, limit: int | None):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {d.key}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    seen: list[tuple[str, str]] = []
    current: dict[str, str] = {}
    url = f"{d.stack.api_url}/v1/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(("id:", "event:")):
                key, _, value = line.partition(": ")
                current[key] = value
            elif line == "" and current:
                seen.append((current["id"], current["event"]))
                current = {}
                if limit is not None and len(seen) >= limit:
                    break  # disconnect mid-stream
    return seen


def job_status(d: Deployment, job_id: str) -> str:
    with d.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()["status"]


def stored_events(d: Deployment, job_id: str) -> list[tuple[str, str]]:
    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            return [
                (str(r.id), r.kind)
                for r in conn.execute(
                    select(JobEvent.id, JobEvent.kind)
                    .where(JobEvent.job_id == uuid.UUID(job_id))
                    .order_by(JobEvent.id)
                )
            ]
    finally:
        engine.dispose()


def test_reconnect_with_last_event_id_sees_every_event_once(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        # One failed call, then an answer; each call takes a while, so the client
        # disconnects and reconnects while the job is still running.
        d.fault("gpu-sim", mode="error_500", count=1, latency_ms=2000)
        with d.client() as client:
            job_id = d.submit(client).json()["id"]
        seen = read_events(d, job_id, None, limit=2)  # queued, claimed
        assert job_status(d, job_id) not in TERMINAL_STATUSES  # reconnecting mid-job
        seen += read_events(d, job_id, seen[-1][0], limit=2)  # calling, retrying
        assert job_status(d, job_id) not in TERMINAL_STATUSES
        seen += read_events(d, job_id, seen[-1][0], limit=None)  # to the end
        stored = stored_events(d, job_id)
        assert seen == [("0", "queued"), *stored]  # all of them, in order, none twice
        kinds = [kind for _, kind in stored]
        assert kinds[:3] == ["claimed", "calling", "retrying"] and kinds[-1] == "answered"
        with d.client() as client:
            bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
            assert bad.status_code == 422
            missing = client.get(f"/v1/jobs/{uuid.uuid4()}/events")
            assert missing.status_code == 404


def test_tierq_watch_follows_a_job(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        env = {**d.stack.env, "TIERQ_URL": d.stack.api_url, "TIERQ_KEY": d.key}
        submitted = subprocess.run(
            [sys.executable, "-m", "cli", "submit", "hi", "--no-wait"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        watched = subprocess.run(
            [sys.executable, "-m", "cli", "watch", job_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert watched.returncode == 0, watched.stderr
        assert "claimed" in watched.stdout and "answered" in watched.stdout
        assert "You said: hi" in watched.stdout
        status = subprocess.run(
            [sys.executable, "-m", "cli", "status", job_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["id"] == job_id and shown["status"] == "succeeded"
        assert shown["served_by"]["backend"] == "gpu-sim"
        missing = subprocess.run(
            [sys.executable, "-m", "cli", "status", str(uuid.uuid4())],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert missing.returncode != 0 and "404" in missing.stderr


def test_a_terminal_status_is_never_read_without_the_final_event(
    env: dict[str, str], api_key: str
) -> None:
    """The worker commits the final event and the terminal status between the reader's two
    statements: whatever the reader returns, a terminal status comes with that event."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.routes.events import _since
    from tests.test_api import BODY, auth, end_job, on_statement

    with TestClient(create_app()) as client:
        job_id = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()["id"]
    with on_statement("FROM job", lambda: end_job(job_id, backend="b")) as fired:
        events, status = _since(uuid.UUID(job_id), 0)
    assert fired.is_set()
    kinds = [e.kind for e in events]
    assert status != "succeeded" or kinds[-1:] == ["answered"], (status, kinds)
    events, status = _since(uuid.UUID(job_id), 0)  # and the next read has both
    assert status == "succeeded" and [e.kind for e in events][-1] == "answered"


def test_a_watch_token_lets_a_browser_follow_one_job_for_a_while(
    env: dict[str, str], api_key: str
) -> None:
    """EventSource cannot send Authorization: a short-lived token in the URL instead, good
    for that job's events only."""
    import time

    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from api import watch_tokens
    from api.app import create_app
    from api.routes.events import WATCH_TOKEN_SECONDS
    from tests.test_api import BODY, auth, end_job
    from tierq.db import db_now, session_scope
    from tierq.models import ApiKey

    with TestClient(create_app()) as client:
        job_id, other = (
            client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()["id"] for _ in range(2)
        )
        end_job(job_id, backend="b")  # so its stream ends
        issued = client.post(f"/v1/jobs/{job_id}/watch-token", headers=auth(api_key))
        assert issued.status_code == 201
        grant = issued.json()
        left = datetime.fromisoformat(grant["expires_at"]).timestamp() - time.time()
        assert WATCH_TOKEN_SECONDS - 30 < left <= WATCH_TOKEN_SECONDS

        events = client.get(grant["url"])  # no Authorization header
        assert events.status_code == 200, events.text
        assert "event: answered" in events.text

        def refused(url: str) -> dict[str, Any]:
            response = client.get(url)
            assert response.status_code == 401, (url, response.text)
            return response.json()

        token = grant["token"]
        assert refused(f"/v1/jobs/{other}/events?token={token}")["errors"][0]["field"] == "token"
        assert refused(f"/v1/jobs/{job_id}/events?token={token[:-2]}xx")
        assert refused(f"/v1/jobs/{job_id}/events?token=garbage")
        assert refused(f"/v1/jobs/{job_id}?token={token}")  # the events endpoint only
        assert (
            client.post(f"/v1/jobs/{uuid.uuid4()}/watch-token", headers=auth(api_key)).status_code
            == 404
        )

        owner = uuid.UUID(token.split(".")[1])
        expired = watch_tokens.sign(uuid.UUID(job_id), owner, int(time.time()) - 1)
        assert "expired" in refused(f"/v1/jobs/{job_id}/events?token={expired}")["detail"]

        # Whoever reads the database has the key's hash: it signs nothing (it did, in wt1).
        with session_scope() as session:
            key_hash = session.get(ApiKey, owner).key_hash  # type: ignore[union-attr]
        expires = int(time.time()) + 60
        for version, message in (
            ("wt1", f"wt1:{job_id}:{owner}:{expires}"),  # the old scheme, exactly
            ("wt2", f"wt2\n{job_id}\n{owner}\n{expires}"),  # today's, keyed with the hash
        ):
            digest = hmac.new(key_hash.encode(), message.encode(), hashlib.sha256).digest()
            signature = base64.urlsafe_b64encode(digest).decode().rstrip("=")
            refused(f"/v1/jobs/{job_id}/events?token={version}.{owner.hex}.{expires}.{signature}")

        with session_scope() as session:  # revoking the key voids its tokens
            session.execute(update(ApiKey).where(ApiKey.id == owner).values(revoked_at=db_now()))
        refused(grant["url"])


def test_a_watch_token_is_accepted_only_in_the_form_it_was_issued(
    env: dict[str, str], api_key: str
) -> None:
    """Other spellings of the same key id, expiry or signature are refused, not parsed into
    the same values: a token is a string to compare, not a format to be lenient with."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.test_api import BODY, auth, end_job

    with TestClient(create_app()) as client:
        job_id = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()["id"]
        end_job(job_id, backend="b")  # so a stream that is let in ends
        token = client.post(f"/v1/jobs/{job_id}/watch-token", headers=auth(api_key)).json()["token"]
        version, owner, expires, signature = token.split(".")
        # The signature's last character carries 2 unused bits: the next one in the
        # alphabet decodes to the same bytes.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = signature[:-1] + alphabet[alphabet.index(signature[-1]) + 1]
        variants = {
            "padded": token + "=",
            "upper-case key id": f"{version}.{owner.upper()}.{expires}.{signature}",
            "hyphenated key id": f"{version}.{uuid.UUID(owner)}.{expires}.{signature}",
            "signed expiry": f"{version}.{owner}.+{expires}.{signature}",
            "zero-padded expiry": f"{version}.{owner}.0{expires}.{signature}",
            "underscored expiry": f"{version}.{owner}.{expires[:4]}_{expires[4:]}.{signature}",
            "other digits": f"{version}.{owner}."
            + expires.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
            + f".{signature}",
            "same bytes, other base64": f"{version}.{owner}.{expires}.{twin}",
            "upper-case version": token.upper()[:3] + token[3:],
            "a trailing part": token + ".x",
            "spaces": f" {token} ",
        }
        for name, variant in variants.items():
            response = client.get(f"/v1/jobs/{job_id}/events", params={"token": variant})
            assert response.status_code == 401, (name, variant, response.text)
        assert client.get(f"/v1/jobs/{job_id}/events", params={"token": token}).status_code == 200


@contextlib.contextmanager
def settings_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> Iterator[None]:
    """TIERQ_* variables for the block; the settings cache forgets them afterwards."""
    from tierq.settings import get_settings

    with monkeypatch.context() as patch:
        for name, value in values.items():
            patch.setenv(f"TIERQ_{name.upper()}", value)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()
    get_settings.cache_clear()


def test_watch_tokens_outlive_a_secret_rotation_only_while_the_previous_one_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from api import watch_tokens

    job, key = uuid.uuid4(), uuid.uuid4()
    old, new = "o" * 40, "n" * 40
    with settings_env(monkeypatch, home=str(tmp_path), secret=old):
        token = watch_tokens.sign(job, key, 2_000_000_000)
        assert watch_tokens.verify(token, job) == watch_tokens.Grant(key, 2_000_000_000)
        assert watch_tokens.verify(token, uuid.uuid4()) is None  # another job's
    with settings_env(monkeypatch, home=str(tmp_path), secret=new, secret_previous=old):
        assert watch_tokens.verify(token, job) == watch_tokens.Grant(key, 2_000_000_000)
        fresh = watch_tokens.sign(job, key, 2_000_000_000)
        assert fresh != token  # signed with the new one
    with settings_env(monkeypatch, home=str(tmp_path), secret=new):
        assert watch_tokens.verify(token, job) is None  # rotation done: the old one is void
        assert watch_tokens.verify(fresh, job) is not None
    assert not (tmp_path / "secret").exists()  # a secret that is set is not written anywhere


def test_the_zero_install_secret_is_made_once_and_readable_by_the_owner_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from api import watch_tokens

    job, key = uuid.uuid4(), uuid.uuid4()
    home = tmp_path / "home"
    with settings_env(monkeypatch, home=str(home), secret=""):
        token = watch_tokens.sign(job, key, 2_000_000_000)
        secret_file = home / "secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        made = secret_file.read_text()
    watch_tokens._secrets.cache_clear()  # as a new process would: read from the file
    with settings_env(monkeypatch, home=str(home)):
        assert watch_tokens.verify(token, job) is not None
        assert secret_file.read_text() == made
        assert list(home.iterdir()) == [secret_file]  # no temporary file left behind
    with settings_env(monkeypatch, home=str(tmp_path / "elsewhere")):
        assert watch_tokens.verify(token, job) is None  # another home, another secret


def test_a_last_event_id_is_digits_within_the_range_of_ids(
    env: dict[str, str], api_key: str
) -> None:
    """Was parsed by int(): a 25-digit id reached the query (SQLite: OverflowError in the
    middle of the 200 stream), and '+5' or ' 5' were taken for 5."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.test_api import BODY, auth, end_job

    with TestClient(create_app()) as client:
        job_id = client.post("/v1/jobs", json=BODY, headers=auth(api_key)).json()["id"]
        end_job(job_id, backend="b")
        url = f"/v1/jobs/{job_id}/events"
        for bad in ("9" * 25, "+5", "-1", "5_0", "x"):
            response = client.get(url, headers={**auth(api_key), "Last-Event-ID": bad})
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["errors"][0]["field"] == "Last-Event-ID"
        resumed = client.get(url, headers={**auth(api_key), "Last-Event-ID": "0"})
        assert resumed.status_code == 200 and "event: answered" in resumed.text
