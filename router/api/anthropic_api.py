"""Anthropic-compatible handler: POST /v1/messages (streaming and not), as Moonshot serves K2.

Requests become K2 chat messages (system, text, tool_use -> assistant tool_calls, tool_result ->
tool messages) rendered by the same template as the OpenAI API. The real sampling temperature is the
request's temperature (default 1.0) times `anthropic_temperature_scale` (0.6), like Moonshot's API.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from k2serve.router.api.protocol import AnthropicMessage, MessagesRequest, read_request
from k2serve.router.api.request_params import check_schema, request_deadline, request_id, sampling_params
from k2serve.router.api.sse import anthropic_event, anthropic_text_delta
from k2serve.router.api.streaming import prime_first, streaming_response, while_connected
from k2serve.router.context import RouterContext
from k2serve.router.errors import APIError, anthropic_error_body
from k2serve.router.generation.choice import collect_choice
from k2serve.router.generation.events import ChoiceSpec, DoneEvent, TextEvent, ToolEvent, Usage
from k2serve.router.pool.worker import GuidedRequest
from k2serve.router.text.tool_ids import next_tool_call_index, normalize_tool_call_ids

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}


def to_chat_messages(req: MessagesRequest) -> list[dict]:
    """Anthropic system + messages -> OpenAI-shaped chat messages for the K2 template."""
    out: list[dict] = []
    system = req.system_text()
    if system is not None:
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for message in req.messages:
        out.extend(_convert(message, names))
    return out


def _convert(message: AnthropicMessage, names: dict[str, str]) -> list[dict]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts, calls, results = [], [], []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            names[block.id] = block.name
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        else:
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "name": names.get(block.tool_use_id, "tool"), "content": block.text()})
    if message.role == "assistant":
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        return [msg | {"tool_calls": calls}] if calls else [msg]
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def to_tools(req: MessagesRequest) -> list[dict] | None:
    if not req.tools:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        check_schema(tool.input_schema, f"tools[{i}].input_schema")
        fn = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            fn["description"] = tool.description
        tools.append({"type": "function", "function": fn})
    return tools


def tool_guide(req: MessagesRequest, tools, first_index: int, guided_auto: bool) -> GuidedRequest | None:
    """tool_choice auto/any/tool/none -> the worker's tool-call constraint."""
    choice = req.tool_choice.type if req.tool_choice else "auto"
    if not tools:
        if req.tool_choice is not None and choice != "none":
            raise APIError(400, "tool_choice needs tools")
        return None
    if choice == "any":
        return GuidedRequest("tool_call", tools=tuple(tools), mode="required", first_index=first_index)
    if choice == "tool":
        names = [t["function"]["name"] for t in tools]
        if req.tool_choice.name not in names:
            raise APIError(400, f"tool_choice names `{req.tool_choice.name}`, which is not among the tools {names}")
        return GuidedRequest("tool_call", tools=tuple(tools), mode="named", name=req.tool_choice.name,
                             first_index=first_index)
    if choice == "auto" and guided_auto:
        return GuidedRequest("tool_call", tools=tuple(tools), mode="auto", first_index=first_index)
    return None


async def prepare(ctx: RouterContext, req: MessagesRequest, rid: str):
    await ctx.check_model(req.model)
    stops = req.stop_sequences or []
    if len(stops) > ctx.config.max_stop_strings:
        raise APIError(400, f"at most {ctx.config.max_stop_strings} stop_sequences are supported")
    tools = to_tools(req)
    messages = normalize_tool_call_ids(to_chat_messages(req))
    guided = tool_guide(req, tools, next_tool_call_index(messages), ctx.config.guided_tool_calls)
    prompt = ctx.render_prompt(messages, tools)
    max_tokens = ctx.max_tokens_for(len(prompt), req.max_tokens)
    temperature = (req.temperature if req.temperature is not None else 1.0) * ctx.config.anthropic_temperature_scale
    params = sampling_params(ctx, req, rid, prompt, max_tokens, 0, guided, None, temperature)
    choice = req.tool_choice.type if req.tool_choice else "auto"
    disable_parallel = bool(req.tool_choice and req.tool_choice.disable_parallel_tool_use)
    spec = ChoiceSpec(stop_strings=stops, parse_tools=bool(tools), emit_tool_calls=choice != "none",
                      max_tool_calls=1 if disable_parallel else None,
                      tool_names=[t["function"]["name"] for t in tools or ()])
    return params, spec


def _usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens}


def _tool_input(arguments: str) -> Any:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}  # malformed JSON is still returned to the client
    return value if isinstance(value, dict) else {"_value": value}


async def messages(ctx: RouterContext, request: Request) -> Response:
    """POST /v1/messages: the Anthropic Messages API."""
    deadline = request_deadline(ctx, request)
    req = await read_request(request, MessagesRequest, ctx.config.max_body_bytes)
    rid = request_id(request)
    params, spec = await prepare(ctx, req, rid)
    [stream] = ctx.run_choices([params], spec, deadline)
    msg_id = f"msg_{rid}"
    if req.stream:
        [stream] = await prime_first(ctx, request, [stream])
        return streaming_response(ctx, request, stream_events(ctx, stream, msg_id, len(params.prompt_token_ids)), rid)
    r = await while_connected(ctx, request, collect_choice(stream))
    content: list[dict] = [{"type": "text", "text": r.text}] if r.text else []
    content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _tool_input(c["arguments"])}
                for c in r.tool_calls]
    body = {"id": msg_id, "type": "message", "role": "assistant", "model": ctx.model_name, "content": content,
            "stop_reason": _stop_reason(r.finish_reason, r.stop_string), "stop_sequence": r.stop_string,
            "usage": _usage(r.usage)}
    return JSONResponse(body, headers={"x-request-id": rid})


def _stop_reason(finish_reason: str, stop_string: str | None) -> str:
    return "stop_sequence" if stop_string is not None else STOP_REASONS.get(finish_reason, "end_turn")


async def stream_events(ctx: RouterContext, stream, msg_id: str, num_prompt: int) -> AsyncIterator[str]:
    """message_start, ping, content blocks (text_delta / input_json_delta), message_delta, message_stop."""
    start = {"id": msg_id, "type": "message", "role": "assistant", "model": ctx.model_name, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": num_prompt, "output_tokens": 0}}
    yield anthropic_event("message_start", {"message": start})
    yield anthropic_event("ping", {})
    blocks = _BlockWriter()
    try:
        async for ev in stream:
            for chunk in blocks.write(ev):
                yield chunk
    except APIError as exc:
        yield anthropic_event("error", {"error": anthropic_error_body(exc)["error"]})


class _BlockWriter:
    """Turns generation events into Anthropic content-block events (one open block at a time)."""

    def __init__(self) -> None:
        self._index = -1
        self._open: str | None = None   # "text" | "tool_use"

    def write(self, ev) -> list[str]:
        if isinstance(ev, TextEvent):
            if not ev.text:
                return []
            return self._ensure("text", {"type": "text", "text": ""}) + [anthropic_text_delta(self._index, ev.text)]
        if isinstance(ev, ToolEvent):
            d = ev.delta
            out = self._close() if d.id is not None else []
            if d.id is not None:
                out += self._ensure("tool_use", {"type": "tool_use", "id": d.id, "name": d.name, "input": {}})
            if d.arguments and self._open == "tool_use":
                out.append(anthropic_event("content_block_delta", {"index": self._index, "delta": {
                    "type": "input_json_delta", "partial_json": d.arguments}}))
            return out
        return self._finish(ev)

    def _ensure(self, kind: str, block: dict) -> list[str]:
        if self._open == kind and kind == "text":
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        return out + [anthropic_event("content_block_start", {"index": self._index, "content_block": block})]

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [anthropic_event("content_block_stop", {"index": self._index})]

    def _finish(self, ev: DoneEvent) -> list[str]:
        delta = {"stop_reason": _stop_reason(ev.finish_reason, ev.stop_string), "stop_sequence": ev.stop_string}
        return self._close() + [anthropic_event("message_delta", {"delta": delta, "usage": _usage(ev.usage)}),
                                anthropic_event("message_stop", {})]
