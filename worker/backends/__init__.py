"""Backend clients, one per wire protocol; ``client_for`` picks the one a backend speaks."""

from __future__ import annotations

import httpx

from tierq.config import BackendConfig
from tierq.errors import ErrorClass
from worker.backends.anthropic import AnthropicClient
from worker.backends.base import BackendClient, ChatAnswer
from worker.backends.errors import BackendError, parse_retry_after
from worker.backends.ollama import OllamaClient
from worker.backends.openai_compat import OpenAIClient

__all__ = [
    "AnthropicClient",
    "BackendClient",
    "BackendError",
    "ChatAnswer",
    "ErrorClass",
    "OllamaClient",
    "OpenAIClient",
    "client_for",
    "parse_retry_after",
]

CLIENTS: dict[str, type[BackendClient]] = {
    "openai": OpenAIClient,
    "ollama": OllamaClient,
    "anthropic": AnthropicClient,
}


def client_for(config: BackendConfig, http: httpx.AsyncClient | None = None) -> BackendClient:
    """The client for ``config.protocol``; pass ``http`` to share one connection pool (on
    the event loop that runs the calls)."""
    return CLIENTS[config.protocol](config, http)
