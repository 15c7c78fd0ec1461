"""What the protocol translations share: content a protocol cannot carry, data URLs, tool
call arguments.

A request in OpenAI's shape may hold something a protocol has no way to say (an image by
URL for Ollama, audio for Anthropic). Translation raises ``Untranslatable`` then, and the
client reports it as the backend refusing the request (a CLIENT error): dropping the part
silently would answer a question the client did not ask.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.S)


class Untranslatable(ValueError):
    """A request this protocol cannot carry; the message says which part and why."""


@dataclass(frozen=True)
class DataURL:
    media_type: str
    data: bytes

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


def parse_data_url(url: str) -> DataURL | None:
    """A ``data:`` URL's media type and bytes; None if ``url`` is not a data URL."""
    match = _DATA_URL.match(url)
    if match is None:
        return None
    media_type = match["type"].strip().lower() or "text/plain"
    raw = match["data"]
    if ";base64" in match["params"].lower():
        try:
            # Some clients wrap base64 in lines; whitespace is not part of the data.
            data = base64.b64decode(re.sub(r"\s+", "", raw), validate=True)
        except (binascii.Error, ValueError):
            raise Untranslatable("a data: URL's base64 data is not valid base64") from None
    else:
        data = unquote_to_bytes(raw)
    return DataURL(media_type, data)


def arguments_object(arguments: Any, name: str) -> dict[str, Any]:
    """A tool call's arguments (JSON text in OpenAI's shape) as the object Anthropic and
    Ollama want. Empty text is no arguments: some servers write "" for a call without any."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise Untranslatable(f"tool call {name!r}: arguments are not JSON text")
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise Untranslatable(f"tool call {name!r}: arguments are not valid JSON") from None
    if not isinstance(value, dict):
        raise Untranslatable(f"tool call {name!r}: arguments are not a JSON object")
    return value


def part_kind(part: Any) -> str:
    return str(part.get("type")) if isinstance(part, dict) else ""


def image_url_of(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise Untranslatable("an image_url part without a url")
    return url
