"""The smallest JSON value a JSON schema accepts: the simulated model's structured output.

Tool-call arguments and JSON-mode answers must validate against the schema the client
sent, or a client that checks them (the OpenAI SDK's ``parse``, an agent framework) fails
on the simulator where it would pass on a real model. Only what schemas for tools and
structured output use is covered: types, required properties, enums and consts, local
``$ref`` (pydantic's ``$defs``), ``anyOf``/``oneOf``/``allOf``, and size and range limits.
"""

from __future__ import annotations

import math
from typing import Any

# Deeper than any sane schema; a recursive $ref (a tree of nodes) stops here.
MAX_DEPTH = 32


def minimal_instance(schema: Any) -> Any:
    """A small value valid for ``schema``: required properties only, "x", 1, true, []."""
    return _instance(schema, schema if isinstance(schema, dict) else {}, 0)


def _instance(schema: Any, root: dict[str, Any], depth: int) -> Any:
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return {}  # `true` or `{}` accepts anything; an object is what clients expect
    if "$ref" in schema:
        return _instance(_resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _instance(_first_not_null(schema[key]), root, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        return _all_of(schema, root, depth)
    return _typed(_type_of(schema), schema, root, depth)


def _typed(kind: str, schema: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        count = schema.get("minItems", 0)
        items = schema.get("items", {})
        return [_instance(items, root, depth + 1) for _ in range(count if count > 0 else 0)]
    if kind == "string":
        length = schema.get("minLength", 1)
        return "x" * max(length if isinstance(length, int) else 1, 1)
    if kind in ("integer", "number"):
        return _number(schema)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return {}


def _object(schema: dict[str, Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = schema.get("required")
    names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    return {name: _instance(properties.get(name, {}), root, depth + 1) for name in names}


def _number(schema: dict[str, Any]) -> int:
    value = 1
    low, high = schema.get("minimum"), schema.get("maximum")
    low_x, high_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if _is_number(low) and value < low:
        value = math.ceil(low)
    if _is_number(low_x) and value <= low_x:
        value = math.floor(low_x) + 1
    if _is_number(high) and value > high:
        value = math.floor(high)
    if _is_number(high_x) and value >= high_x:
        value = math.ceil(high_x) - 1
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "object"


def _first_not_null(options: list[Any]) -> Any:
    for option in options:
        if not (isinstance(option, dict) and option.get("type") == "null"):
            return option
    return options[0]


def _all_of(schema: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    parts = [_instance(part, root, depth + 1) for part in schema["allOf"]]
    rest = {k: v for k, v in schema.items() if k != "allOf"}
    if rest:
        parts.append(_instance(rest, root, depth + 1))
    if all(isinstance(part, dict) for part in parts):
        merged: dict[str, Any] = {}
        for part in parts:
            merged |= part
        return merged
    return parts[0]


def _resolve(ref: Any, root: dict[str, Any]) -> Any:
    """A local reference such as ``#/$defs/City``; anything else accepts any value."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return {}
    node: Any = root
    for token in ref[1:].split("/"):
        if not token:
            continue
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or token not in node:
            return {}
        node = node[token]
    return node
