"""Which models a backend says it serves (its model list), and whether the configured
model is among them: pure functions over the decoded answer.

OpenAI-compatible servers and Anthropic answer ``GET /v1/models`` with ``data[].id``;
Ollama answers ``GET /api/tags`` with ``models[].name`` (and ``model``), always tagged:
a configured ``llama3`` is served as ``llama3:latest``. Anthropic lists dated ids
(``claude-sonnet-4-5-20250929``) while configurations often name an alias
(``claude-sonnet-4-5``, ``claude-3-7-sonnet-latest``, ``claude-sonnet-4-0``).
"""

from __future__ import annotations

import re
from typing import Any

from tierq.config import Protocol

# Anthropic's largest page: the whole list in one request, where the default page is 20.
ANTHROPIC_PAGE = 1000
# A mismatch message names at most this many models (a hosted API lists a hundred).
NAMED_IN_ERROR = 10
_DATED = re.compile(r"-\d{8}$")
_ALIAS_SUFFIX = re.compile(r"-(latest|0)$")


def models_path(protocol: Protocol) -> str:
    if protocol == "ollama":
        return "/api/tags"
    if protocol == "anthropic":
        return f"/v1/models?limit={ANTHROPIC_PAGE}"
    return "/v1/models"


def parse_model_list(protocol: Protocol, body: Any) -> list[str] | None:
    """The model names in a model-list answer; None when it is not one (unknown)."""
    if not isinstance(body, dict):
        return None
    if protocol == "ollama":
        entries, keys = body.get("models"), ("name", "model")
    else:
        entries, keys = body.get("data"), ("id",)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    names = [next((e[k] for k in keys if isinstance(e.get(k), str)), None) for e in entries]
    if any(name is None for name in names):
        return None
    return [name for name in names if name is not None]


def ollama_tagged(name: str) -> str:
    """``llama3`` → ``llama3:latest``; a registry's ``host:5000/llama3`` too (the tag is
    after the last slash)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def anthropic_base(name: str) -> str:
    """``claude-sonnet-4-5-20250929`` and ``claude-sonnet-4-5`` → ``claude-sonnet-4-5``;
    ``claude-3-7-sonnet-latest`` → ``claude-3-7-sonnet``; ``claude-sonnet-4-0`` →
    ``claude-sonnet-4`` (what ``claude-sonnet-4-20250514`` is without its date)."""
    return _ALIAS_SUFFIX.sub("", _DATED.sub("", name))


def serves(protocol: Protocol, model: str, served: list[str]) -> bool:
    if model in served:
        return True
    if protocol == "ollama":
        return ollama_tagged(model) in {ollama_tagged(s) for s in served}
    if protocol == "anthropic" and not _DATED.search(model):
        # An alias names the latest snapshot; a dated id names exactly one.
        return anthropic_base(model) in {anthropic_base(s) for s in served}
    return False


def model_error(protocol: Protocol, model: str, served: list[str] | None) -> str | None:
    """Why ``model`` is not served, or None when it is or the list is unknown."""
    if served is None or serves(protocol, model, served):
        return None
    named = ", ".join(served[:NAMED_IN_ERROR])
    more = f", … ({len(served) - NAMED_IN_ERROR} more)" if len(served) > NAMED_IN_ERROR else ""
    return f"serves [{named}{more}], not '{model}'"
