"""OpenAI-compatible handlers: POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from k2serve.router.api.protocol import ChatCompletionRequest, CompletionRequest, read_request
from k2serve.router.api.request_params import (check_common, check_schema, request_deadline, request_id,
                                              sampling_params)
from k2serve.router.api.sse import DONE, OpenAIFrames
from k2serve.router.api.streaming import prime_first, sse_with_errors, streaming_response, while_connected
from k2serve.router.context import RouterContext
from k2serve.router.errors import APIError
from k2serve.router.generation.choices import collect_all, merge_choices
from k2serve.router.generation.events import ChoiceResult, ChoiceSpec, DoneEvent, TextEvent, ToolEvent, Usage, sum_usage
from k2serve.router.pool.worker import GuidedRequest, TokenLogprob
from k2serve.router.text.tool_ids import next_tool_call_index, normalize_tool_call_ids


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def logprob_entry(tokenizer, lp: TokenLogprob) -> dict:
    """One chat-completions logprobs.content entry."""
    def one(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
    entry = one(lp.token_id, lp.logprob)
    entry["top_logprobs"] = [one(t, v) for t, v in lp.top]
    return entry


# ---------------------------------------------------------------- chat completions


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Request messages -> template messages (developer -> system; tool names filled from their call)."""
    names: dict[str, str] = {}
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [_history_call(c) for c in m.tool_calls]
            names.update({c.id: c.function.name for c in m.tool_calls})
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, "a tool message needs tool_call_id", param="messages")
            msg["tool_call_id"] = m.tool_call_id
            msg.setdefault("name", names.get(m.tool_call_id, "tool"))
        out.append(msg)
    return out


def _history_call(call) -> dict:
    args = call.function.arguments
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def chat_tools(req: ChatCompletionRequest) -> list[dict] | None:
    if not req.tools:
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    for i, tool in enumerate(tools):
        check_schema(tool["function"].get("parameters", {"type": "object"}), f"tools[{i}].function.parameters")
    return tools


def chat_guided(ctx: RouterContext, req: ChatCompletionRequest, tools, first_index: int) -> GuidedRequest | None:
    """The worker-side constraint: forced/triggered tool calls or a response_format."""
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    fmt = req.response_format
    wants_format = fmt is not None and fmt.type != "text"
    if tools and choice != "none":
        if isinstance(choice, str) and choice == "auto":
            return GuidedRequest("tool_call", tools=tuple(tools), mode="auto", first_index=first_index) \
                if ctx.config.guided_tool_calls and not wants_format else None
        if wants_format:
            raise APIError(400, "response_format cannot be combined with a forced tool_choice", param="response_format")
        return _forced_tool_guide(choice, tools, first_index)
    return _format_guide(fmt) if wants_format else None


def _forced_tool_guide(choice, tools, first_index: int) -> GuidedRequest:
    if choice == "required":
        return GuidedRequest("tool_call", tools=tuple(tools), mode="required", first_index=first_index)
    names = [t["function"]["name"] for t in tools]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not among the tools {names}",
                       param="tool_choice")
    return GuidedRequest("tool_call", tools=tuple(tools), mode="named", name=choice.function.name,
                         first_index=first_index)


def _format_guide(fmt) -> GuidedRequest:
    if fmt.type == "json_object":
        return GuidedRequest("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    check_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
    return GuidedRequest("json_schema", json_schema=json.dumps(fmt.json_schema.schema_))


async def prepare_chat(ctx: RouterContext, req: ChatCompletionRequest, rid: str):
    """Validate, render and tokenize; returns (GenerateParams per choice, ChoiceSpec)."""
    await ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    check_common(ctx, req.n, req.stop_list(), req.top_logprobs)
    tools = chat_tools(req)
    messages = normalize_tool_call_ids(chat_messages(req))
    guided = chat_guided(ctx, req, tools, next_tool_call_index(messages))
    prompt = ctx.render_prompt(messages, tools)
    max_tokens = ctx.max_tokens_for(len(prompt), req.max_completion_tokens or req.max_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = [sampling_params(ctx, req, rid, prompt, max_tokens, i, guided, logprobs, req.temperature)
              for i in range(req.n)]
    choice = req.tool_choice or "auto"
    spec = ChoiceSpec(stop_strings=req.stop_list(), parse_tools=bool(tools), emit_tool_calls=choice != "none",
                      max_tool_calls=1 if req.parallel_tool_calls is False else None,
                      tool_names=[t["function"]["name"] for t in tools or ()])
    return params, spec



async def chat_completions(ctx: RouterContext, request: Request) -> Response:
    """POST /v1/chat/completions: OpenAI chat completions (streaming and not)."""
    deadline = request_deadline(ctx, request)
    req = await read_request(request, ChatCompletionRequest, ctx.config.max_body_bytes)
    rid = request_id(request)
    params, spec = await prepare_chat(ctx, req, rid)
    meta = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": ctx.model_name}
    streams = ctx.run_choices(params, spec, deadline)
    if req.stream:
        streams = await prime_first(ctx, request, streams)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = chat_stream(ctx, streams, meta, req.logprobs, include_usage)
        return streaming_response(ctx, request, sse_with_errors(body), rid)
    results = await while_connected(ctx, request, collect_all(streams))
    return JSONResponse(chat_response(ctx, results, meta, req.logprobs), headers={"x-request-id": rid})


def chat_response(ctx: RouterContext, results: list[ChoiceResult], meta: dict, logprobs: bool) -> dict:
    choices = []
    for i, r in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": r.text if (r.text or not r.tool_calls) else None}
        if r.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in r.tool_calls]
        lps = {"content": [logprob_entry(ctx.tokenizer, lp) for lp in r.logprobs]} if logprobs else None
        choices.append({"index": i, "message": message, "logprobs": lps, "finish_reason": r.finish_reason})
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": usage_json(sum_usage([r.usage for r in results]))}


async def chat_stream(ctx: RouterContext, streams, meta: dict, logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    frames = OpenAIFrames({**meta, "object": "chat.completion.chunk"}, usage_on_every_chunk=include_usage)
    for i in range(len(streams)):
        yield frames.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    usages: list[Usage] = []
    async for i, event in merge_choices(streams):
        if isinstance(event, DoneEvent):
            usages.append(event.usage)
            yield frames.chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}])
        elif isinstance(event, TextEvent) and not logprobs:
            yield frames.chat_content(i, event.text)
        else:
            yield frames.chunk([_chat_delta(ctx, i, event, logprobs)])
    if include_usage:
        yield frames.chunk([], usage_json(sum_usage(usages)))
    yield DONE


def _chat_delta(ctx: RouterContext, i: int, event: TextEvent | ToolEvent, logprobs: bool) -> dict:
    if isinstance(event, ToolEvent):
        d = event.delta
        call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
        if d.id is not None:
            call.update(id=d.id, type="function")
            call["function"]["name"] = d.name
        return {"index": i, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
    lps = {"content": [logprob_entry(ctx.tokenizer, lp) for lp in event.logprobs]} if logprobs else None
    return {"index": i, "delta": {"content": event.text}, "logprobs": lps, "finish_reason": None}


# ---------------------------------------------------------------- completions


def completion_prompts(ctx: RouterContext, prompt) -> list[list[int]]:
    """prompt (text, texts, ids or list of ids) -> token id lists; text never becomes control tokens."""
    if isinstance(prompt, str):
        prompts = [ctx.tokenizer.encode(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [ctx.tokenizer.encode(p) for p in prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    vocab = ctx.model_info.vocab_size
    for ids in prompts:
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


async def completions(ctx: RouterContext, request: Request) -> Response:
    """POST /v1/completions: OpenAI (legacy) text completions."""
    deadline = request_deadline(ctx, request)
    req = await read_request(request, CompletionRequest, ctx.config.max_body_bytes)
    rid = request_id(request)
    await ctx.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    check_common(ctx, req.n, req.stop_list(), req.logprobs)
    prompts = completion_prompts(ctx, req.prompt)
    params = []
    for k, prompt in enumerate(prompts):
        max_tokens = ctx.max_tokens_for(len(prompt), req.max_tokens)
        params += [sampling_params(ctx, req, rid, prompt, max_tokens, k * req.n + i, None, req.logprobs,
                                   req.temperature) for i in range(req.n)]
    spec = ChoiceSpec(stop_strings=req.stop_list())
    meta = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
    streams = ctx.run_choices(params, spec, deadline)
    want_lps = req.logprobs is not None
    if req.stream:
        streams = await prime_first(ctx, request, streams)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = completion_stream(ctx, streams, meta, want_lps, include_usage)
        return streaming_response(ctx, request, sse_with_errors(body), rid)
    results = await while_connected(ctx, request, collect_all(streams))
    choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                "logprobs": completion_logprobs(ctx, r.logprobs) if want_lps else None} for i, r in enumerate(results)]
    return JSONResponse({**meta, "choices": choices, "usage": usage_json(sum_usage([r.usage for r in results]))},
                        headers={"x-request-id": rid})


def completion_logprobs(ctx: RouterContext, lps: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions logprobs object."""
    def text(t: int) -> str:
        return ctx.tokenizer.token_bytes(t).decode("utf-8", errors="replace")
    tokens = [text(lp.token_id) for lp in lps]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


async def completion_stream(ctx: RouterContext, streams, meta: dict, want_lps: bool,
                            include_usage: bool) -> AsyncIterator[str]:
    frames = OpenAIFrames(meta)
    usages: list[Usage] = []
    async for i, event in merge_choices(streams):
        if isinstance(event, DoneEvent):
            usages.append(event.usage)
            yield frames.chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": event.finish_reason}])
        elif not want_lps:
            yield frames.completion_text(i, event.text)
        else:
            lps = completion_logprobs(ctx, event.logprobs)
            yield frames.chunk([{"index": i, "text": event.text, "logprobs": lps, "finish_reason": None}])
    if include_usage:
        yield frames.chunk([], usage_json(sum_usage(usages)))
    yield DONE


# ---------------------------------------------------------------- models


async def list_models(ctx: RouterContext, request: Request) -> Response:
    """GET /v1/models: the one served model."""
    info = await ctx.ensure_model_info()
    return JSONResponse({"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": 0,
                                                     "owned_by": "k2serve", "max_model_len": info.context_length}]})
