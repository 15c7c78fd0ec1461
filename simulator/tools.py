"""What a chat request asks beyond text, read the way each protocol spells it: the tool to
call, the tool result to answer, the JSON schema to answer in.

The rules the simulated model follows: it calls a tool when the request offers tools, does
not forbid them, and the user spoke last (not a tool's result); the tool named by the
request's tool choice, else the first one. When the last message is a tool's result, it
answers with that result's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.answer import ANY_OBJECT, ToolSpec, text_of


class RequestError(ValueError):
    """A request the protocol would reject; the message goes into its error shape."""


@dataclass(frozen=True)
class Extras:
    tool: ToolSpec | None = None
    tool_result: str | None = None
    json_schema: Any = None


def openai_extras(data: dict[str, Any]) -> Extras:
    last = data["messages"][-1]
    if last["role"] in ("tool", "function"):
        return Extras(tool_result=text_of(last.get("content")))
    tools = _function_tools(data.get("tools"))
    choice = data.get("tool_choice", "auto")
    tool = None
    if tools and choice != "none" and last["role"] == "user":
        tool = _chosen(tools, _openai_choice(choice))
    return Extras(tool=tool, json_schema=_openai_schema(data.get("response_format")))


def anthropic_extras(data: dict[str, Any]) -> Extras:
    last = data["messages"][-1]
    results = _tool_results(last.get("content"))
    if last["role"] == "user" and results:
        return Extras(tool_result="\n".join(results))
    tools = _anthropic_tools(data.get("tools"))
    choice = data.get("tool_choice") or {"type": "auto"}
    if not isinstance(choice, dict):
        raise RequestError("tool_choice: Input should be an object")
    if not tools or choice.get("type") == "none" or last["role"] != "user":
        return Extras()
    name = choice.get("name") if choice.get("type") == "tool" else None
    return Extras(tool=_chosen(tools, name))


def ollama_extras(data: dict[str, Any]) -> Extras:
    last = data["messages"][-1]
    if last["role"] == "tool":
        return Extras(tool_result=text_of(last.get("content")))
    tools = _function_tools(data.get("tools"))
    tool = _chosen(tools, None) if tools and last["role"] == "user" else None
    return Extras(tool=tool, json_schema=_ollama_schema(data.get("format")))


def _function_tools(tools: Any) -> list[ToolSpec]:
    """OpenAI's and Ollama's tools: ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("tools: Input should be a valid list")
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"tools.{i}.function.name: Field required")
        specs.append(ToolSpec(function["name"], function.get("parameters", {})))
    return specs


def _anthropic_tools(tools: Any) -> list[ToolSpec]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("tools: Input should be a valid list")
    specs = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise RequestError(f"tools.{i}.name: Field required")
        specs.append(ToolSpec(tool["name"], tool.get("input_schema", {})))
    return specs


def _openai_choice(choice: Any) -> str | None:
    """The tool named by ``tool_choice``; None for "auto" and "required"."""
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise RequestError("tool_choice.function.name: Field required")
        return name
    if choice not in ("auto", "required"):
        raise RequestError(f"Invalid value for 'tool_choice': {choice!r}.")
    return None


def _chosen(tools: list[ToolSpec], name: str | None) -> ToolSpec:
    if name is None:
        return tools[0]
    for tool in tools:
        if tool.name == name:
            return tool
    raise RequestError(f"Invalid value for 'tool_choice': tool '{name}' not found in 'tools'.")


def _tool_results(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    blocks = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return [text_of(block.get("content")) for block in blocks]


def _openai_schema(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format.json_schema.schema: Field required")
        return spec["schema"]
    return None


def _ollama_schema(fmt: Any) -> Any:
    if fmt == "json":
        return ANY_OBJECT
    if isinstance(fmt, dict):
        return fmt
    return None


def count_images(body: Any) -> int:
    """Image parts in a logged request, whichever protocol: OpenAI ``image_url`` and
    ``input_image`` parts, Anthropic ``image`` blocks, Ollama ``images`` lists."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        images = message.get("images")
        count += len(images) if isinstance(images, list) else 0
        content = message.get("content")
        if isinstance(content, list):
            kinds = ("image_url", "image", "input_image")
            count += sum(1 for p in content if isinstance(p, dict) and p.get("type") in kinds)
    return count
