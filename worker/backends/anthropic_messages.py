"""OpenAI chat-completions requests as Anthropic Messages bodies.

- system and developer messages become the top-level ``system``;
- the rest become user/assistant turns, same-role runs merged (Anthropic wants them
  alternating): text alone stays a string, joined by a blank line; anything else becomes
  content blocks — ``image`` (base64 for data: URLs, ``url`` for http(s)), ``document``
  (a PDF or text file given as a data: URL), ``tool_use`` for an assistant's tool calls and
  ``tool_result`` for ``tool`` messages, which go in a user turn, first in it;
- tools take ``input_schema``; tool_choice auto/required/named/none is auto/any/tool/none,
  with ``disable_parallel_tool_use`` for ``parallel_tool_calls: false``;
- ``response_format`` json_object and json_schema become a forced tool (``json_tool``)
  whose input schema is the schema asked for (any object for json_object): Anthropic has
  no JSON mode every model and every Messages-speaking server takes, but any of them that
  takes tools returns the input as a valid object. The answer's input is the message text.
"""

from __future__ import annotations

import re
from typing import Any

from tierq.messages import text_of
from worker.backends.base import max_tokens_of
from worker.backends.translate import (
    Untranslatable,
    arguments_object,
    image_url_of,
    parse_data_url,
    part_kind,
)

# Anthropic requires max_tokens; OpenAI-shaped requests often leave it out.
DEFAULT_MAX_TOKENS = 4096
SYSTEM_ROLES = ("system", "developer")
JSON_TOOL = "json_answer"
JSON_TOOL_DESCRIPTION = (
    "Give your whole answer by calling this tool: its input is the JSON answer the user asked for."
)
ANY_OBJECT: dict[str, Any] = {"type": "object"}
DOCUMENT_TYPES = ("application/pdf", "text/plain")
_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")

Content = str | list[dict[str, Any]]


def messages_body(request: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """The Messages API body for ``request``; raises Untranslatable for what it cannot carry."""
    messages = [m for m in request.get("messages", []) if isinstance(m, dict)]
    system = "\n\n".join(
        text_of(m.get("content")) for m in messages if m.get("role") in SYSTEM_ROLES
    )
    turns = to_turns([m for m in messages if m.get("role") not in SYSTEM_ROLES])
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens_of(request) or DEFAULT_MAX_TOKENS,
        "messages": turns,
    }
    if system:
        body["system"] = system
    if isinstance(request.get("temperature"), int | float):
        body["temperature"] = min(float(request["temperature"]), 1.0)  # OpenAI allows 2
    if request.get("top_p") is not None:
        body["top_p"] = request["top_p"]
    if (stop := request.get("stop")) is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    body |= tool_fields(request, _names_used(turns))
    if stream:
        body["stream"] = True
    return body


# -- tools ---------------------------------------------------------------------------------
def json_tool_of(request: dict[str, Any]) -> str | None:
    """The name of the tool that carries a JSON answer, if the request asks for one and
    may get it this turn (a named or required tool choice wants a call to its own tools)."""
    kind = (request.get("response_format") or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    if request.get("tools") and (
        request.get("tool_choice") == "required" or isinstance(request.get("tool_choice"), dict)
    ):
        return None
    names = {t["function"]["name"] for t in _function_tools(request)}
    name = JSON_TOOL
    while name in names:  # never shadow a tool of the client's
        name += "_"
    return name


def tool_fields(request: dict[str, Any], used: list[str]) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` for ``request``; ``used``: tool names in the turns."""
    tools = [_anthropic_tool(t["function"]) for t in _function_tools(request)]
    choice = tool_choice(request) if tools else None
    if not tools and used:
        # Tool calls in the conversation, none offered now: the blocks need their tools
        # declared (some Messages servers refuse them otherwise); none may be called.
        tools = [{"name": n, "input_schema": ANY_OBJECT} for n in dict.fromkeys(used)]
        choice = {"type": "none"}
    if (json_tool := json_tool_of(request)) is not None:
        callable_tools = bool(tools) and (choice is None or choice["type"] != "none")
        tools.append(_json_tool(json_tool, request["response_format"]))
        # Offered tools may still be called, as OpenAI's JSON modes let them be: then the
        # model must call one of them or the answer tool (any), never write free text.
        if callable_tools:
            choice = {**(choice or {}), "type": "any"}
        else:
            choice = {"type": "tool", "name": json_tool}
    fields: dict[str, Any] = {}
    if tools:
        fields["tools"] = tools
    if choice is not None:
        fields["tool_choice"] = choice
    return fields


def tool_choice(request: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's tool_choice and parallel_tool_calls as Anthropic's tool_choice."""
    choice = request.get("tool_choice")
    if choice == "none":
        return {"type": "none"}  # takes no disable_parallel_tool_use
    if choice == "required":
        result: dict[str, Any] = {"type": "any"}
    elif isinstance(choice, dict):
        result = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    elif choice == "auto" or request.get("parallel_tool_calls") is False:
        result = {"type": "auto"}
    else:
        return None  # Anthropic's default is auto
    if request.get("parallel_tool_calls") is False:
        result["disable_parallel_tool_use"] = True
    return result


def _function_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    tools = request.get("tools") or []
    return [t for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]


def _anthropic_tool(function: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {
        "name": function["name"],
        "input_schema": function.get("parameters") or ANY_OBJECT,
    }
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


def _json_tool(name: str, response_format: dict[str, Any]) -> dict[str, Any]:
    spec = response_format.get("json_schema") or {}
    description = JSON_TOOL_DESCRIPTION
    if spec.get("description"):
        description += " " + spec["description"]
    return {
        "name": name,
        "description": description,
        "input_schema": spec.get("schema") or ANY_OBJECT,
    }


def _names_used(turns: list[dict[str, Any]]) -> list[str]:
    return [
        block["name"]
        for turn in turns
        if isinstance(turn["content"], list)
        for block in turn["content"]
        if block.get("type") == "tool_use"
    ]


# -- turns ---------------------------------------------------------------------------------
def to_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as Anthropic turns: user/assistant only, same-role runs merged."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = "assistant" if message.get("role") == "assistant" else "user"
        content = _content_of(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _merged(turns[-1]["content"], content)
        else:
            turns.append({"role": role, "content": content})
    for turn in turns:
        if isinstance(turn["content"], list):
            # Anthropic wants the results of the previous turn's calls before anything else.
            turn["content"].sort(key=lambda block: block.get("type") != "tool_result")
    return turns


def _merged(first: Content, second: Content) -> Content:
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    return _blocks(first) + _blocks(second)


def _blocks(content: Content) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _content_of(message: dict[str, Any]) -> Content:
    role = message.get("role")
    if role == "tool":
        return [_tool_result(message)]
    if role == "assistant":
        return _assistant_content(message)
    content = message.get("content")
    if not isinstance(content, list):
        return text_of(content)
    if all(part_kind(p) == "text" for p in content):
        return text_of(content)
    return [b for b in (_user_block(p) for p in content) if b is not None]


def _assistant_content(message: dict[str, Any]) -> Content:
    text = text_of(message.get("content")) or message.get("refusal") or ""
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if not calls:
        return text
    return _blocks(text) + [_tool_use(call) for call in calls]


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    name = str(function.get("name", ""))
    return {
        "type": "tool_use",
        "id": safe_id(call.get("id")),
        "name": name,
        "input": arguments_object(function.get("arguments", ""), name),
    }


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": safe_id(message.get("tool_call_id")),
        "content": text_of(message.get("content")),
    }


def safe_id(value: Any) -> str:
    """A tool call id as Anthropic accepts it ([a-zA-Z0-9_-]+); other servers' ids may hold
    any character. The same id maps to the same safe id in the call and in its result."""
    return _ID_UNSAFE.sub("_", str(value or "")) or "call"


def _user_block(part: Any) -> dict[str, Any] | None:
    kind = part_kind(part)
    if kind == "text":
        text = part.get("text")
        return {"type": "text", "text": text} if text else None  # no empty text blocks
    if kind == "image_url":
        return _image_block(image_url_of(part))
    if kind == "file":
        return _document_block(part.get("file") or {})
    raise Untranslatable(f"{kind or 'untyped'} content parts cannot be sent to Anthropic")


def _image_block(url: str) -> dict[str, Any]:
    data = parse_data_url(url)
    if data is None:
        return {"type": "image", "source": {"type": "url", "url": url}}
    source = {"type": "base64", "media_type": data.media_type, "data": data.base64}
    return {"type": "image", "source": source}


def _document_block(file: dict[str, Any]) -> dict[str, Any]:
    """A file part as a document block: a PDF or plain text, given inline as a data: URL.
    An OpenAI file_id names a file stored at OpenAI, which Anthropic cannot read."""
    raw = file.get("file_data")
    data = parse_data_url(raw) if isinstance(raw, str) else None
    if data is None or data.media_type not in DOCUMENT_TYPES:
        raise Untranslatable(
            "file parts go to Anthropic only as file_data, a data: URL of a PDF or plain text"
        )
    if data.media_type == "text/plain":
        source = {
            "type": "text",
            "media_type": "text/plain",
            "data": data.data.decode("utf-8", "replace"),
        }
    else:
        source = {"type": "base64", "media_type": data.media_type, "data": data.base64}
    block: dict[str, Any] = {"type": "document", "source": source}
    if isinstance(file.get("filename"), str) and file["filename"]:
        block["title"] = file["filename"]
    return block
