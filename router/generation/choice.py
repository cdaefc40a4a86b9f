"""Generation: run one choice on a worker and turn its token stream into API-level events.

Both HTTP APIs share this: pick a backend, stream TokenChunks, detokenize incrementally, apply stop
strings on the text (truncate at the match, finish "stop", cancel the worker request), and parse K2
tool calls. Events out: TextEvent (content text + the logprobs of the tokens behind it), ToolEvent
(a tool-call start or argument fragment), DoneEvent (finish reason, usage).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence

from k2serve.router.errors import APIError
from k2serve.router.text.tool_parser import (ContentDelta, StreamingToolParser, ToolCallDelta, finish_reason as
                                tool_finish_reason)
from k2serve.router.pool.worker_client import Finished, GenerateParams, TokenChunk, TokenLogprob, WorkerError


class Backend(Protocol):
    """What the router needs from a worker group (WorkerClient implements it; tests use fakes)."""

    def generate(self, params: GenerateParams) -> AsyncIterator[TokenChunk | Finished]: ...

    async def get_load(self) -> Any: ...

    async def get_model_info(self) -> Any: ...

    async def health(self) -> bool: ...


class RoundRobin:
    """Backend selection behind `pick(prompt_ids)`; the load / prefix-aware balancer replaces it."""

    def __init__(self, backends: Sequence[Backend]):
        if not backends:
            raise ValueError("the router needs at least one worker backend")
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))

    def pick(self, prompt_ids: Sequence[int]) -> Backend:
        return self.backends[next(self._next)]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class TextEvent:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolEvent:
    delta: ToolCallDelta


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str                 # stop | length | tool_calls | abort
    usage: Usage
    stop_string: str | None = None     # the stop string that ended the text, if any


Event = TextEvent | ToolEvent | DoneEvent


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Text safe to emit now; after a match, the text before it (and `matched` is set)."""
        if not self.stops:
            return text
        self._buffer += text
        hit = min(((self._buffer.find(s), s) for s in self.stops if s in self._buffer), default=None)
        if hit is not None:
            self.matched = hit[1]
            out, self._buffer = self._buffer[:hit[0]], ""
            return out
        cut = max(len(self._buffer) - self._hold, 0)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out


@dataclass
class ChoiceSpec:
    """How to post-process one choice's tokens."""

    stop_strings: Sequence[str] = ()
    parse_tools: bool = False            # run the K2 tool-call parser
    emit_tool_calls: bool = True         # False (tool_choice none): markers are dropped, calls too
    max_tool_calls: int | None = None    # 1 when parallel_tool_calls is false
    tool_names: Sequence[str] = ()


@dataclass
class _State:
    usage: Usage = field(default_factory=Usage)
    engine_reason: str = "stop"


class _TokenTimer:
    """Feeds RouterMetrics (when present): time to first token, inter-token gaps, token counts."""

    def __init__(self, metrics: Any):
        self.metrics = metrics
        self.last = time.monotonic()
        self.first = True

    def chunk(self, num_tokens: int) -> None:
        if self.metrics is None or not num_tokens:
            return
        now = time.monotonic()
        if self.first:
            self.metrics.observe_ttft(now - self.last)
        else:
            self.metrics.observe_itl((now - self.last) / num_tokens)
        self.first, self.last = False, now
        self.metrics.tokens(generated=num_tokens)

    def done(self, usage: Usage) -> None:
        if self.metrics is not None:
            self.metrics.tokens(prompt=usage.prompt_tokens, cached=usage.cached_tokens)


async def run_choice(backend: Backend, params: GenerateParams, tokenizer: Any, spec: ChoiceSpec,
                     detokenizer_factory, metrics: Any = None) -> AsyncIterator[Event]:
    """Stream one choice's events; raises APIError when the worker refuses or fails the request.

    `metrics` (a RouterMetrics, optional) receives TTFT, inter-token latency and token counts.
    """
    timer = _TokenTimer(metrics)
    detok = detokenizer_factory(tokenizer)
    stops = StopStringMatcher(spec.stop_strings)
    parser = StreamingToolParser(spec.tool_names) if spec.parse_tools else None
    state = _State()
    stream = backend.generate(params)
    last = None  # the latest item: its cumulative counts are the usage (built once, not per token)
    try:
        async for item in stream:
            last = item
            if isinstance(item, Finished):
                state.engine_reason = item.finish_reason
                break
            timer.chunk(len(item.token_ids))
            text = stops.push(detok.push(list(item.token_ids)))
            for event in _text_events(text, item.logprobs, parser, spec):
                yield event
            if stops.matched is not None:
                break  # closing the stream below cancels the worker request
    except WorkerError as exc:
        raise APIError(exc.status, exc.message) from exc
    finally:
        await stream.aclose()
    if last is not None:
        state.usage = Usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
    timer.done(state.usage)
    for event in _final_events(detok, stops, parser, spec, state):
        yield event


def _text_events(text: str, logprobs, parser, spec: ChoiceSpec) -> list[Event]:
    if parser is None:
        return [TextEvent(text, tuple(logprobs))] if text or logprobs else []
    events: list[Event] = []
    for delta in parser.feed(text) if text else []:
        events.extend(_parsed_event(delta, spec))
    if logprobs:
        events.append(TextEvent("", tuple(logprobs)))
    return events


def _parsed_event(delta, spec: ChoiceSpec) -> list[Event]:
    if isinstance(delta, ContentDelta):
        return [TextEvent(delta.text)]
    if not spec.emit_tool_calls or (spec.max_tool_calls is not None and delta.index >= spec.max_tool_calls):
        return []
    return [ToolEvent(delta)]


def _final_events(detok, stops: StopStringMatcher, parser, spec: ChoiceSpec, state: _State) -> list[Event]:
    tail = "" if stops.matched is not None else stops.push(detok.flush())
    if stops.matched is None:
        tail += stops.flush()
    events = _text_events(tail, (), parser, spec)
    if parser is not None:
        for delta in parser.finish():
            events.extend(_parsed_event(delta, spec))
    return events + [DoneEvent(_finish_reason(parser, spec, stops, state), state.usage, stops.matched)]


def _finish_reason(parser, spec: ChoiceSpec, stops: StopStringMatcher, state: _State) -> str:
    if stops.matched is not None:
        return "stop"
    reason = state.engine_reason
    if parser is not None and spec.emit_tool_calls:
        return tool_finish_reason(parser.result(), reason)
    return reason


@dataclass
class ChoiceResult:
    """A whole choice, collected (non-streaming responses)."""

    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # {"id", "name", "arguments"}
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_string: str | None = None
    usage: Usage = field(default_factory=Usage)


async def collect_choice(events: AsyncIterator[Event]) -> ChoiceResult:
    """Accumulate a choice's events into a ChoiceResult."""
    result = ChoiceResult()
    parts: list[str] = []
    async for event in events:
        if isinstance(event, TextEvent):
            parts.append(event.text)
            result.logprobs.extend(event.logprobs)
        elif isinstance(event, ToolEvent):
            _add_tool_delta(result.tool_calls, event.delta)
        else:
            result.finish_reason, result.usage, result.stop_string = (event.finish_reason, event.usage,
                                                                      event.stop_string)
    result.text = "".join(parts)
    return result


def _add_tool_delta(calls: list[dict], delta: ToolCallDelta) -> None:
    if delta.id is not None:
        calls.append({"id": delta.id, "name": delta.name or "", "arguments": delta.arguments})
    elif 0 <= delta.index < len(calls):
        calls[delta.index]["arguments"] += delta.arguments


def sum_usage(usages: Sequence[Usage]) -> Usage:
    """Usage of an n-choice request: the prompt counted once, completions summed."""
    if not usages:
        return Usage()
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages), usages[0].cached_tokens)


@dataclass
class RouterContext:
    """Everything a request handler needs; lives on `app.state.ctx` (no module globals)."""

    config: Any                      # RouterConfig
    picker: Any                      # has pick(prompt_ids) -> Backend
    tokenizer: Any                   # router.tokenizer.K2Tokenizer
    template: Any                    # router.chat_template.ChatTemplate
    detokenizer_factory: Any         # tokenizer -> object with push(ids) -> str, flush() -> str
    model_info: Any = None           # WorkerModelInfo, fetched from a worker at startup or first use
    metrics: Any = None              # router.metrics.RouterMetrics, optional

    async def ensure_model_info(self) -> Any:
        """The served model's info, asked of the workers once; 503 while none answers."""
        if self.model_info is None:
            if hasattr(self.picker, "wait_discovered"):
                await self.picker.wait_discovered()  # a GroupPool learns its groups after startup
            for backend in self.picker.backends:
                try:
                    self.model_info = await backend.get_model_info()
                    break
                except WorkerError:
                    continue
        if self.model_info is None:
            raise APIError(503, "no worker is available to serve the model")
        return self.model_info

    @property
    def model_name(self) -> str:
        return self.config.model_name or self.model_info.model_name

    async def check_model(self, requested: str) -> None:
        """404 unless `requested` names the served model."""
        await self.ensure_model_info()
        if requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def render_prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """Chat template + tokenizer -> prompt ids; a template failure is the client's 400."""
        try:
            return self.template.encode(self.tokenizer, messages, tools=tools, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(400, f"cannot render the conversation: {exc}", param="messages") from None

    def max_tokens_for(self, num_prompt: int, requested: int | None) -> int:
        """max_tokens within the context: default fills it; 400 when the prompt plus it does not fit."""
        context = self.model_info.context_length
        if requested is None:
            requested = context - num_prompt
            if requested < 1:
                raise APIError(400, f"The prompt has {num_prompt} tokens, which fills the model's "
                                    f"context of {context} tokens", param="messages",
                               code="context_length_exceeded")
        if num_prompt + requested > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but "
                                f"{num_prompt} prompt tokens plus max_tokens {requested} were requested",
                           param="max_tokens", code="context_length_exceeded")
        return requested
