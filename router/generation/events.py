"""What one choice of a request produces, as the HTTP APIs consume it.

A choice's stream is TextEvents (content text and the logprobs of the tokens behind it) and ToolEvents
(a tool-call start or argument fragment), then one DoneEvent (finish reason, usage). ChoiceSpec says how
a choice's tokens are post-processed; ChoiceResult is a whole choice, collected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from k2serve.router.pool.worker import TokenLogprob
from k2serve.router.text.tool_parser import ToolCallDelta


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


@dataclass
class ChoiceSpec:
    """How to post-process one choice's tokens."""

    stop_strings: Sequence[str] = ()
    parse_tools: bool = False            # run the K2 tool-call parser
    emit_tool_calls: bool = True         # False (tool_choice none): markers are dropped, calls too
    max_tool_calls: int | None = None    # 1 when parallel_tool_calls is false
    tool_names: Sequence[str] = ()


@dataclass
class ChoiceResult:
    """A whole choice, collected (non-streaming responses)."""

    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # {"id", "name", "arguments"}
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_string: str | None = None
    usage: Usage = field(default_factory=Usage)


def sum_usage(usages: Sequence[Usage]) -> Usage:
    """Usage of an n-choice request: the prompt counted once, completions summed."""
    if not usages:
        return Usage()
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages), usages[0].cached_tokens)
