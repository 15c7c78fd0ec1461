"""How a chat message is stored as a conversation turn: its text for people (and the
minimal tier), and the whole message when it is more than a role and a string."""

from __future__ import annotations

from typing import Any


def text_of(content: Any) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def turn_values(message: dict[str, Any]) -> dict[str, Any]:
    """The role, content and message columns of a turn holding ``message``."""
    plain = set(message) <= {"role", "content"} and isinstance(message.get("content"), str)
    return {
        "role": message["role"],
        "content": text_of(message.get("content")),
        "message": None if plain else message,
    }


def as_message(role: str, content: str, message: dict[str, Any] | None) -> dict[str, Any]:
    """A stored turn as the message it was."""
    return message or {"role": role, "content": content}
