"""How a backend call failed: the classes the failure policy (``tierq.policy``) decides on.

Shared by the worker's backend clients, which classify every failure, and by the policy,
which must not import the worker (dependencies point from ``worker`` to ``tierq``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    CONNECT = "connect"  # refused, reset, dropped mid-answer: the server is not there
    TIMEOUT = "timeout"  # connect or read timeout
    SERVER = "server"  # 5xx other than overload
    OVERLOADED = "overloaded"  # 503, 529: up but shedding load
    RATE_LIMITED = "rate_limited"  # 429, usually with Retry-After
    MALFORMED = "malformed"  # 2xx whose body is not the protocol's shape
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit this backend's model
    CLIENT = "client"  # any other 4xx: the request itself is wrong for this backend

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again (here or on a peer)."""
        return self not in (ErrorClass.CONTEXT_LENGTH, ErrorClass.CLIENT)
