"""Pydantic models of the router's HTTP requests (OpenAI chat/completions, Anthropic messages).

Top-level request models forbid unknown fields (an unsupported parameter is a 400, not silently
ignored); nested message objects ignore unknown fields so that clients can send back the message
objects we returned (the OpenAI SDK echoes `refusal`, `annotations`, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from k2serve.router.errors import APIError, validation_message

_FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"
INT32_MAX = 2 ** 31 - 1  # the worker protocol's counts and top_k are int32, its seed int64
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- OpenAI


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class FunctionCall(_Loose):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Loose):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        """Content as one string (text parts joined), None when absent."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionDef(_Loose):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Loose):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Loose):
    name: str


class NamedToolChoice(_Loose):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Loose):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class SamplingFields(_Request):
    """Sampling fields shared by chat and completions (OpenAI names; top_k/min_p/... as vLLM extras).

    The bounds here are the APIs' published ones and the wire's integer types; the usable range of every
    sampling number is checked in one place, the worker (its in-stream 400 reaches the client as this
    API's 400), so an extra such as repetition_penalty carries no bound of its own here.
    """

    model: str
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if v == "" or v == []:
            raise ValueError("prompt must not be empty")
        return v


# ---------------------------------------------------------------- Anthropic


class AnthropicText(_Loose):
    type: Literal["text"]
    text: str


class AnthropicToolUse(_Loose):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class AnthropicToolResult(_Loose):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[AnthropicText] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


AnthropicBlock = Annotated[Union[AnthropicText, AnthropicToolUse, AnthropicToolResult], Field(discriminator="type")]


class AnthropicMessage(_Loose):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(_Loose):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(_Request):
    """POST /v1/messages (Anthropic)."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicText] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None          # accepted and ignored
    cache_control: dict[str, Any] | None = None  # accepted and ignored (the prefix cache is automatic)

    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "".join(b.text for b in self.system)
        return self.system


async def read_request(request, model_cls: type[BaseModel], max_bytes: int) -> BaseModel:
    """Read a JSON body of at most `max_bytes` (413 above) into `model_cls` (400 when invalid)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise APIError(400, validation_message(exc.errors())) from None
