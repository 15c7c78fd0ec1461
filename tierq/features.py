"""What a chat request needs of a backend, and which backends can give it.

A backend declares what it cannot do (``unsupported`` in its configuration); its wire
protocol adds what the protocol itself cannot carry. A request that needs something no
backend of a tier can do skips that tier; one that no tier of its route can serve is
refused at the door, naming the field that needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any


class Feature(StrEnum):
    TOOLS = "tools"  # tools offered, or tool calls and results in the conversation
    IMAGES = "images"  # image_url content parts
    IMAGE_URLS = "image_urls"  # images by http(s) address (not inline data: URLs)
    AUDIO = "audio"  # input_audio parts, audio output
    FILES = "files"  # file content parts
    JSON_MODE = "json_mode"  # response_format json_object
    JSON_SCHEMA = "json_schema"  # response_format json_schema (structured outputs)
    LOGPROBS = "logprobs"
    CHOICES = "n"  # more than one choice per request
    # Not a need: a backend that ignores max_completion_tokens is sent max_tokens instead.
    MAX_COMPLETION_TOKENS = "max_completion_tokens"


# The field a client is told about when nothing can serve its request.
FIELD_OF = {
    Feature.TOOLS: "tools",
    Feature.IMAGES: "messages",
    Feature.IMAGE_URLS: "messages",
    Feature.AUDIO: "messages",
    Feature.FILES: "messages",
    Feature.JSON_MODE: "response_format",
    Feature.JSON_SCHEMA: "response_format",
    Feature.LOGPROBS: "logprobs",
    Feature.CHOICES: "n",
}

# What each wire protocol cannot carry, whatever the server behind it.
PROTOCOL_UNSUPPORTED: Mapping[str, frozenset[Feature]] = {
    "openai": frozenset(),
    "ollama": frozenset(
        {Feature.AUDIO, Feature.FILES, Feature.LOGPROBS, Feature.CHOICES,
         Feature.MAX_COMPLETION_TOKENS, Feature.IMAGE_URLS}  # images inline (base64) only
    ),
    # JSON modes travel as a forced tool (worker/backends/anthropic_messages.py).
    "anthropic": frozenset(
        {Feature.AUDIO, Feature.LOGPROBS, Feature.CHOICES, Feature.MAX_COMPLETION_TOKENS}
    ),
}  # fmt: skip

# What a server speaking the OpenAI protocol with its own quirks (``dialect``) ignores.
DIALECT_UNSUPPORTED: Mapping[str, frozenset[Feature]] = {
    # llama-cpp-python's server ignores max_completion_tokens (it generated 425 tokens for a
    # limit of 5) and knows no response_format json_schema (tierq sends its own form).
    "llama.cpp": frozenset({Feature.MAX_COMPLETION_TOKENS}),
}

_PART_FEATURES = {"image_url": Feature.IMAGES, "input_audio": Feature.AUDIO, "file": Feature.FILES}


def needs(request: Mapping[str, Any]) -> frozenset[Feature]:
    """What answering ``request`` (an OpenAI-shaped chat request) takes of a backend."""
    found: set[Feature] = set()
    if request.get("tools") and request.get("tool_choice") != "none":
        found.add(Feature.TOOLS)
    for message in request.get("messages") or []:
        found |= _message_needs(message)
    kind = (request.get("response_format") or {}).get("type")
    if kind == "json_object":
        found.add(Feature.JSON_MODE)
    elif kind == "json_schema":
        found.add(Feature.JSON_SCHEMA)
    if request.get("logprobs"):
        found.add(Feature.LOGPROBS)
    if (request.get("n") or 1) > 1:
        found.add(Feature.CHOICES)
    if "audio" in (request.get("modalities") or []):
        found.add(Feature.AUDIO)
    return frozenset(found)


def _message_needs(message: Mapping[str, Any]) -> set[Feature]:
    found = set()
    if message.get("tool_calls") or message.get("role") == "tool":
        found.add(Feature.TOOLS)
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and (feature := _PART_FEATURES.get(part.get("type"))):
                found.add(feature)
                if str((part.get("image_url") or {}).get("url", "")).startswith("http"):
                    found.add(Feature.IMAGE_URLS)
    return found


# What offers tools to a model; a backend without tools gets a request only with
# tool_choice "none", and some servers (llama.cpp without --jinja) refuse the fields.
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")


def fitted(request: dict[str, Any], lacks: frozenset[Feature]) -> dict[str, Any]:
    """The request as a backend lacking ``lacks`` can take it, meaning unchanged: no tool
    fields where tools are not supported (the request does not need them: routing saw to
    that), and max_tokens where max_completion_tokens is ignored (a server that ignores the
    newer name would generate without a limit)."""
    fit = dict(request)
    if Feature.TOOLS in lacks:
        for key in TOOL_KEYS:
            fit.pop(key, None)
    if Feature.MAX_COMPLETION_TOKENS in lacks and "max_completion_tokens" in fit:
        fit["max_tokens"] = fit.pop("max_completion_tokens")
    return fit


def unsupported(
    protocol: str, declared: Iterable[str], dialect: str | None = None
) -> frozenset[Feature]:
    implied = PROTOCOL_UNSUPPORTED.get(protocol, frozenset())
    implied |= DIALECT_UNSUPPORTED.get(dialect or "", frozenset())
    return implied | {Feature(f) for f in declared}


def missing(wanted: Iterable[Feature], lacking: frozenset[Feature]) -> list[Feature]:
    """The needs a backend lacking ``lacking`` cannot meet (max_completion_tokens is never
    one: it is translated)."""
    return sorted(f for f in wanted if f in lacking and f is not Feature.MAX_COMPLETION_TOKENS)
