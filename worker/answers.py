"""The shapes a job's call goes out and comes back in: the OpenAI-style request a tier is
sent (degraded after the first tier) and the chat.completion stored as its result."""

from __future__ import annotations

import time
from typing import Any

from tierq.config import TierConfig
from tierq.models import Job, Turn
from worker.backends.base import ChatAnswer


def build_request(
    job: Job, turns: list[Turn], tier: TierConfig, first_tier: bool
) -> dict[str, Any]:
    """The OpenAI-shaped request for this tier: the conversation so far, degraded if needed."""
    request: dict[str, Any] = dict(job.request)
    request["messages"] = [{"role": t.role, "content": t.content} for t in turns]
    if not first_tier:
        rules = tier.degrade
        if rules.max_tokens is not None:
            request["max_tokens"] = min(
                request.get("max_tokens") or rules.max_tokens, rules.max_tokens
            )
        if rules.temperature is not None:
            request["temperature"] = rules.temperature
    return request


def notice_prefix(notice: str) -> str:
    return f"{notice}\n\n"


def completion(
    job: Job, answer: ChatAnswer, *, tier: str, backend: str, quality: str, notice: str | None
) -> dict[str, Any]:
    content = notice_prefix(notice) + answer.content if notice else answer.content
    return {
        "id": f"chatcmpl-{job.id.hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
        "tierq": {"tier": tier, "backend": backend, "quality": quality},
    }
