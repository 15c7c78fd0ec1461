"""Watch tokens: a short-lived grant to follow one job's events without the API key.

A token is ``wt2.<key id, 32 lowercase hex>.<expiry, unix seconds>.<HMAC-SHA256, unpadded
base64url>``. The HMAC covers the job, the key id and the expiry, and is keyed with the
server's secret (``TIERQ_SECRET``), which is not stored beside the keys: whoever can read
the database cannot mint tokens. The key id stays in the token so that the caller checks it
is still a live key; revoking the key voids its tokens.

Only the canonical form is accepted. ``uuid.UUID`` and ``int`` take many spellings of the
same value (upper case, braces, ``+5``, ``5_0``, other scripts' digits), and base64 decoders
take padding and stray bits; a token is matched whole against one pattern instead, and its
signature compared as text with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tierq.settings import get_settings

log = logging.getLogger(__name__)
VERSION = "wt2"
SECRET_FILE = "secret"
_TOKEN = re.compile(r"wt2\.([0-9a-f]{32})\.([1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class Grant:
    """What a token with a valid signature says: whose it is and until when."""

    key_id: uuid.UUID
    expires: int


def _signature(secret: bytes, job_id: uuid.UUID, key_id: uuid.UUID, expires: int) -> str:
    message = f"{VERSION}\n{job_id}\n{key_id}\n{expires}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(job_id: uuid.UUID, key_id: uuid.UUID, expires: int, secret: bytes | None = None) -> str:
    """A token for ``job_id``'s events, minted for ``key_id``, valid until ``expires``."""
    signature = _signature(secret or signing_secrets()[0], job_id, key_id, expires)
    return f"{VERSION}.{key_id.hex}.{expires}.{signature}"


def verify(token: str, job_id: uuid.UUID) -> Grant | None:
    """The grant of a canonical token signed for ``job_id`` with the current or the previous
    secret; None for anything else. Expiry and the key's liveness are the caller's."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    key_id, expires = uuid.UUID(hex=match[1]), int(match[2])
    given = match[3].encode()
    valid = False
    for secret in signing_secrets():  # every one is tried: no early exit to time
        expected = _signature(secret, job_id, key_id, expires).encode()
        valid |= hmac.compare_digest(given, expected)
    return Grant(key_id, expires) if valid else None


def signing_secrets() -> tuple[bytes, ...]:
    """The secret new tokens are signed with, then the previous one if it is still set."""
    settings = get_settings()
    return _secrets(
        settings.home.resolve(),
        settings.secret.get_secret_value(),
        settings.secret_previous.get_secret_value(),
    )


@lru_cache(maxsize=4)
def _secrets(home: Path, current: str, previous: str) -> tuple[bytes, ...]:
    first = current.encode() if current else _home_secret(home)
    return (first, previous.encode()) if previous else (first,)


def _home_secret(home: Path) -> bytes:
    """The zero-install default's secret: made once, kept in TIERQ_HOME/secret (0600).

    Written to a private temporary file and linked into place: two processes starting at
    once both end up reading the one that was linked first, never a half-written file.
    """
    path = home / SECRET_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        temporary = home / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
                file.flush()
                os.fsync(file.fileno())
            # Another process may have been first: then its secret is the one.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by others: whoever reads it can mint watch tokens", path)
    value = path.read_text().strip()
    if len(value) < 32:
        raise RuntimeError(f"{path} holds no usable secret; delete it to make a new one")
    return value.encode()
