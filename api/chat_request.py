"""OpenAI's Chat Completions request, validated to its documented shape.

Every documented field is checked (types, ranges, the message and content-part kinds);
fields tierq does not know are kept and passed to OpenAI-protocol backends unchanged: that
is how server extras travel (vLLM's ``guided_json``, llama.cpp's ``min_p``, TGI's
``top_n_tokens``, all sent by the OpenAI SDK as ``extra_body``). Text anywhere in a request,
extras included, must be storable: no NUL character (Postgres text and jsonb cannot hold
it), and valid Unicode (a lone surrogate cannot be encoded to UTF-8 for the backend).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_TEXT = 1_000_000
MAX_JSON_DEPTH = 32


def check_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "must be valid Unicode (a lone surrogate such as \\ud800 is not)"
        ) from None
    return value


def check_json(value: Any, depth: int = 0) -> Any:
    """Every string (keys included) of a JSON value passes ``check_text``."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json(item, depth + 1)
    return value


Text = Annotated[str, AfterValidator(check_text)]
JSONObject = Annotated[dict[str, Any], AfterValidator(check_json)]
JSONValue = Annotated[Any, AfterValidator(check_json)]  # a field tierq passes on unread
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Shape(BaseModel):
    """A documented object: its fields are checked, and it has no others."""

    model_config = ConfigDict(extra="forbid")


# -- content parts ------------------------------------------------------------------------
class TextPart(_Shape):
    type: Literal["text"]
    text: Text = Field(max_length=MAX_TEXT)


class ImageURL(_Shape):
    url: Text = Field(pattern=r"^(https?://|data:image/)", max_length=20_000_000)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Shape):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Shape):
    data: Text
    format: Literal["wav", "mp3"]


class AudioPart(_Shape):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Shape):
    file_data: Text | None = None
    file_id: Text | None = None
    filename: Text | None = None


class FilePart(_Shape):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Shape):
    type: Literal["refusal"]
    refusal: Text


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
Parts = Annotated[list[TextPart], Field(min_length=1)]


# -- tool calls -----------------------------------------------------------------------------
class FunctionCall(_Shape):
    name: Text = Field(max_length=256)
    arguments: Text = Field(max_length=MAX_TEXT)  # JSON text, as the model wrote it


class ToolCall(_Shape):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class CustomCall(_Shape):
    name: Text = Field(max_length=256)
    input: Text = Field(max_length=MAX_TEXT)  # free text (or the tool's grammar)


class CustomToolCall(_Shape):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["custom"]
    custom: CustomCall


def _call_kind(value: Any) -> str:
    """A tool call's type; a call without one is a function call."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else "function"


AnyToolCall = Annotated[
    Annotated[ToolCall, Tag("function")] | Annotated[CustomToolCall, Tag("custom")],
    Discriminator(_call_kind),
]


# -- messages -------------------------------------------------------------------------------
class _Message(BaseModel):
    # Servers add fields of their own to messages (vLLM's reasoning_content sent back in a
    # multi-turn chat); they are kept and passed on, checked only for storable text.
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, JSONValue] = Field(init=False)
    name: Text | None = Field(None, max_length=64)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Text | Parts = Field(min_length=1, max_length=MAX_TEXT)


class UserMessage(_Message):
    role: Literal["user"]
    content: Text | Annotated[list[UserPart], Field(min_length=1)] = Field(
        min_length=1, max_length=MAX_TEXT
    )


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Text | Annotated[list[AssistantPart], Field(min_length=1)] | None = Field(
        None, max_length=MAX_TEXT
    )
    refusal: Text | None = None
    tool_calls: Annotated[list[AnyToolCall], Field(min_length=1, max_length=128)] | None = None
    audio: JSONObject | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and self.tool_calls is None and self.refusal is None:
            raise ValueError("an assistant message needs content, tool_calls or refusal")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Text | Parts = Field(max_length=MAX_TEXT)
    tool_call_id: Text = Field(min_length=1, max_length=256)


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]
ANSWERABLE_LAST = ("user", "tool")  # a request ends with a question or a tool's result


# -- tools and output formats ---------------------------------------------------------------
class FunctionDef(_Shape):
    name: Name
    description: Text | None = Field(None, max_length=100_000)
    parameters: JSONObject | None = None
    strict: bool | None = None


class Tool(_Shape):
    type: Literal["function"]
    function: FunctionDef


class CustomTextFormat(_Shape):
    type: Literal["text"]


class Grammar(_Shape):
    definition: Text = Field(max_length=MAX_TEXT)
    syntax: Literal["lark", "regex"]


class CustomGrammarFormat(_Shape):
    type: Literal["grammar"]
    grammar: Grammar


class CustomDef(_Shape):
    name: Text = Field(min_length=1, max_length=256)
    description: Text | None = Field(None, max_length=100_000)
    format: (
        Annotated[CustomTextFormat | CustomGrammarFormat, Field(discriminator="type")] | None
    ) = None


class CustomTool(_Shape):
    """A tool whose input is free text (or text in a grammar), not JSON arguments."""

    type: Literal["custom"]
    custom: CustomDef


AnyTool = Annotated[Tool | CustomTool, Field(discriminator="type")]


class NamedFunction(_Shape):
    name: Name


class NamedToolChoice(_Shape):
    type: Literal["function"]
    function: NamedFunction


class NamedCustom(_Shape):
    name: Text = Field(min_length=1, max_length=256)


class NamedCustomToolChoice(_Shape):
    type: Literal["custom"]
    custom: NamedCustom


class AllowedTools(_Shape):
    mode: Literal["auto", "required"]
    tools: Annotated[list[JSONObject], Field(min_length=1, max_length=128)]


class AllowedToolChoice(_Shape):
    """The model may call only these of the offered tools."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[
        NamedToolChoice | NamedCustomToolChoice | AllowedToolChoice, Field(discriminator="type")
    ]
)


def _tool_name(tool: Any) -> tuple[str, Any]:
    """A tool's (or a tool reference's) type and name: ("function", "get_weather")."""
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    body = tool.get(kind) if isinstance(tool, dict) else getattr(tool, str(kind), None)
    name = body.get("name") if isinstance(body, dict) else getattr(body, "name", None)
    return str(kind), name


class JSONSchemaFormat(_Shape):
    name: Name
    description: Text | None = None
    schema_: JSONObject | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class TextFormat(_Shape):
    type: Literal["text"]


class JSONObjectFormat(_Shape):
    type: Literal["json_object"]


class JSONSchemaResponse(_Shape):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponse, Field(discriminator="type")
]


class StreamOptions(_Shape):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# -- the request ----------------------------------------------------------------------------
class ChatParams(BaseModel):
    """The chat-completions parameters a backend is sent besides the conversation."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, JSONValue] = Field(init=False)

    model: Text = Field(min_length=1, max_length=255)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d+$")], float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: Text | None = Field(None, max_length=256)
    tools: Annotated[list[AnyTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: (
        dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]] | None
    ) = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    modalities: list[Literal["text", "audio"]] | None = None

    @field_validator("metadata")
    @classmethod
    def _sixteen_pairs(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("holds at most 16 key-value pairs")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _names_an_offered_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        offered = {_tool_name(t) for t in info.data.get("tools") or []}
        if isinstance(choice, NamedToolChoice | NamedCustomToolChoice):
            named = [_tool_name(choice)]
        elif isinstance(choice, AllowedToolChoice):
            named = [_tool_name(t) for t in choice.allowed_tools.tools]
        else:
            named = []
        for kind, name in named:
            if (kind, name) not in offered:
                raise ValueError(f"names the {kind} tool '{name}', which is not in tools")
        if choice == "required" and not offered:
            raise ValueError("'required' needs tools")
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value
