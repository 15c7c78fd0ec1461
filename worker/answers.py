"""The shapes a job's call goes out and comes back in: the OpenAI-style request a step of
the job's route is sent (degraded after the first step) and the chat.completion stored as
its result."""

from __future__ import annotations

import time
from typing import Any

from tierq.messages import as_message
from tierq.models import Job, Turn
from tierq.routes import Step
from worker.backends.base import ChatAnswer


def build_request(job: Job, turns: list[Turn], step: Step, first_step: bool) -> dict[str, Any]:
    """The OpenAI-shaped request for this step: the conversation so far, degraded if needed."""
    request: dict[str, Any] = dict(job.request)
    request["messages"] = [as_message(t.role, t.content, t.message) for t in turns]
    if not first_step:
        rules = step.degrade
        if (cap := rules.max_tokens) is not None:
            for key in ("max_tokens", "max_completion_tokens"):
                if request.get(key) is not None:
                    request[key] = min(request[key], cap)
            if request.get("max_completion_tokens") is None:
                request["max_tokens"] = request.get("max_tokens") or cap
        if rules.temperature is not None:
            request["temperature"] = rules.temperature
    return request


def notice_prefix(notice: str) -> str:
    return f"{notice}\n\n"


def completion(
    job: Job, answer: ChatAnswer, *, tier: str, backend: str, quality: str, notice: str | None
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": answer.message(notice_prefix(notice) if notice else ""),
        "logprobs": answer.logprobs,
        "finish_reason": answer.finish_reason,
    }
    return {
        "id": f"chatcmpl-{job.id.hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [choice, *answer.more_choices],
        "usage": usage(answer),
        "tierq": {"tier": tier, "backend": backend, "quality": quality},
    }


def usage(answer: ChatAnswer) -> dict[str, int | None]:
    """Token counts; what the server did not report is null (unknown), never 0."""
    prompt, completion_ = answer.prompt_tokens, answer.completion_tokens
    total = prompt + completion_ if prompt is not None and completion_ is not None else None
    return {"prompt_tokens": prompt, "completion_tokens": completion_, "total_tokens": total}
