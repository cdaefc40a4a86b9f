"""run_choice: one choice's worker token stream -> text, tool-call and done events.

Both HTTP APIs share this: detokenize incrementally, apply stop strings on the text (truncate at the
match, finish "stop", cancel the worker request), and parse K2 tool calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from k2serve.router.errors import APIError
from k2serve.router.generation.events import (ChoiceResult, ChoiceSpec, DoneEvent, Event, TextEvent, ToolEvent,
                                              Usage)
from k2serve.router.metrics import RouterMetrics
from k2serve.router.pool.worker import Finished, StreamItem, WorkerError
from k2serve.router.text.detokenizer import IncrementalDetokenizer
from k2serve.router.text.stop_strings import StopStringMatcher
from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.router.text.tool_parser import ContentDelta, StreamingToolParser, ToolCallDelta
from k2serve.router.text.tool_parser import finish_reason as tool_finish_reason


@dataclass
class _State:
    usage: Usage = field(default_factory=Usage)
    engine_reason: str = "stop"


class _TokenTimer:
    """Feeds RouterMetrics (when present): time to first token, inter-token gaps, token counts."""

    def __init__(self, metrics: RouterMetrics | None):
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


async def run_choice(stream: AsyncIterator[StreamItem], tokenizer: K2Tokenizer, spec: ChoiceSpec,
                     metrics: RouterMetrics | None = None) -> AsyncIterator[Event]:
    """Turn one worker stream into events; raises APIError when the worker refuses or fails the request.

    The stream is closed when this ends (or is closed), which cancels a request still running on the worker.
    `metrics` receives TTFT, inter-token latency and token counts.
    """
    timer = _TokenTimer(metrics)
    # Skipping special tokens drops [EOS] / <|im_end|> but keeps K2's tool-call markers (special: false).
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    stops = StopStringMatcher(spec.stop_strings)
    parser = StreamingToolParser(spec.tool_names) if spec.parse_tools else None
    state = _State()
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
