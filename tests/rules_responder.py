"""A rules responder for the tests: the minimal tier calls it with the OpenAI request."""

from __future__ import annotations

from typing import Any


def opening_hours(request: dict[str, Any]) -> str | None:
    question = request["messages"][-1]["content"].lower()
    return "We are open 9 to 5." if "opening hours" in question else None
