"""OpenAI chat-completions requests as Ollama /api/chat bodies, and Ollama's tool calls back.

- messages keep their roles (developer is system); content parts become the text and an
  ``images`` list of base64 data. Ollama takes images only inline: an image by http(s) URL
  is refused (the worker does not fetch URLs a client names);
- an assistant's tool calls carry their arguments as an object, not JSON text, and no id;
  a tool result is a ``tool`` message named by ``tool_name``, found from the call it
  answers (Ollama matches results to calls by name and order);
- tools are OpenAI's function tools. Ollama has no tool_choice: "none" sends no tools, a
  named tool is sent alone, "required" cannot be enforced (the model may still answer);
- ``response_format`` is ``format``: "json", or the schema itself.

Back, Ollama's tool calls (object arguments, no id) become OpenAI's, with an id of their
own when the server gave none.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tierq.messages import text_of
from worker.backends.translate import (
    Untranslatable,
    arguments_object,
    image_url_of,
    parse_data_url,
    part_kind,
)

ROLES = {"developer": "system"}  # Ollama knows system, user, assistant, tool


def ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool_call_id → the called function's name
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role"))
        item: dict[str, Any] = {
            "role": ROLES.get(role, role),
            "content": text_of(message.get("content")),
        }
        if images := _images_of(message.get("content")):
            item["images"] = images
        if calls := [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]:
            item["tool_calls"] = [_tool_call(call, names) for call in calls]
        if role == "tool" and (name := names.get(str(message.get("tool_call_id")))):
            item["tool_name"] = name
        out.append(item)
    return out


def _tool_call(call: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    function = call.get("function") or {}
    name = str(function.get("name", ""))
    names[str(call.get("id"))] = name
    arguments = arguments_object(function.get("arguments", ""), name)
    return {"function": {"name": name, "arguments": arguments}}


def _images_of(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    images = []
    for part in content:
        kind = part_kind(part)
        if kind == "image_url":
            images.append(_image_data(image_url_of(part)))
        elif kind not in ("text", "refusal"):
            raise Untranslatable(f"{kind or 'untyped'} content parts cannot be sent to Ollama")
    return images


def _image_data(url: str) -> str:
    data = parse_data_url(url)
    if data is None:
        raise Untranslatable(
            "Ollama takes images only inline: send the image as a data: URL (base64), "
            f"not by address ({url[:60]})"
        )
    return data.base64


def ollama_tools(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = [t for t in request.get("tools") or [] if isinstance(t, dict)]
    choice = request.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
    return [_function_tool(t.get("function") or {}) for t in tools]


def _function_tool(function: dict[str, Any]) -> dict[str, Any]:
    # strict (OpenAI's schema enforcement) means nothing to Ollama.
    kept = {k: function[k] for k in ("name", "description", "parameters") if function.get(k)}
    return {"type": "function", "function": kept}


def format_of(response_format: Any) -> Any:
    """OpenAI's response_format as Ollama's ``format``: "json" or a JSON schema."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "json"
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if response_format.get("type") == "json_schema" and schema else None


def openai_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls`` in OpenAI's shape; raises ValueError on a bad shape."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ValueError("message.tool_calls is not a list")
    return [_openai_call(call) for call in calls]


def _openai_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("a tool call without a function name")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)  # an object in Ollama, JSON text in OpenAI
    given = call.get("id")
    return {
        # Unique, not a counter: ids travel in the conversation to later calls, maybe to
        # another protocol, where two calls named call_0 would be one.
        "id": given if isinstance(given, str) and given else f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }
