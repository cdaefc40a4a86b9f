"""Parse Kimi K2's native tool-call output, whole or streamed (docs/k2-format.md, Tool calls).

The model writes optional content, then

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>...<|tool_calls_section_end|>

The router detokenizes without skipping these markers, so they arrive inside the text. Both entry
points share one lexer and one state machine, so a streamed parse always equals the whole-text parse:

* `parse_tool_calls(text)` -> `ParsedOutput(content, tool_calls, has_tool_section)`.
* `StreamingToolParser().feed(delta)` / `.finish()` -> `ContentDelta` and `ToolCallDelta` items.

Rules (each one a bug that real K2 parsers had):
* Whitespace between markers is ignored; calls may follow each other with no separator.
* Arguments are returned verbatim (malformed JSON included), only stripped of surrounding whitespace,
  and stream without a size cap. A marker split across deltas is held back, never leaked.
* Text inside a section but outside a call (e.g. whitespace before the section end) is dropped;
  text after the section end is content again.
* A missing section end still yields every call; a call cut off mid-arguments yields the arguments
  that arrived; a call cut off before its argument marker, or whose id holds no name (none, or one
  without a letter, digit or underscore, as in `:::0`), is dropped.
* Stray markers (a random-weights model emits them anywhere) are dropped, and no marker string can
  ever appear in content, ids or arguments, even when text around a dropped marker spells one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass


class Marker(enum.Enum):
    """The five tool-call marker kinds."""

    SECTION_BEGIN = "section_begin"
    SECTION_END = "section_end"
    CALL_BEGIN = "call_begin"
    ARGUMENT_BEGIN = "argument_begin"
    CALL_END = "call_end"


# The singular `tool_call_section` spelling is a variant K2 has been seen to emit.
MARKER_STRINGS: dict[str, Marker] = {
    "<|tool_calls_section_begin|>": Marker.SECTION_BEGIN,
    "<|tool_call_section_begin|>": Marker.SECTION_BEGIN,
    "<|tool_calls_section_end|>": Marker.SECTION_END,
    "<|tool_call_section_end|>": Marker.SECTION_END,
    "<|tool_call_begin|>": Marker.CALL_BEGIN,
    "<|tool_call_argument_begin|>": Marker.ARGUMENT_BEGIN,
    "<|tool_call_end|>": Marker.CALL_END,
}
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKER_STRINGS))
_MAX_MARKER_LEN = max(len(m) for m in MARKER_STRINGS)
_PROPER_PREFIXES = frozenset(m[:k] for m in MARKER_STRINGS for k in range(1, len(m)))
_ID_PREFIX = "functions."
_IDENTIFIER_CHAR = re.compile(r"\w")  # a name needs one: `:::0` names nothing

Segment = str | Marker


@dataclass(frozen=True)
class ToolCall:
    """One complete (or cut-off) tool call; `index` counts calls within this output from 0."""

    id: str
    name: str
    arguments: str
    index: int


@dataclass(frozen=True)
class ParsedOutput:
    """The parse of a whole model output."""

    content: str
    tool_calls: list[ToolCall]
    has_tool_section: bool
    ends_in_tool_section: bool = False  # no non-whitespace content after the last section began


@dataclass(frozen=True)
class ContentDelta:
    """Content text to pass to the client."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Start of a call (id and name set) or a fragment of its arguments (id and name None)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Delta = ContentDelta | ToolCallDelta


def tool_call_name(call_id: str, tool_names: Iterable[str] = ()) -> str:
    """The function name inside a K2 tool-call id such as `functions.get_weather:0`.

    The name lies between the last `.` before the (last) colon and the colon; with no colon it is the
    whole id minus a `functions.` prefix. When the request declared tools, a declared name that the
    part before the colon spells out (e.g. `my.tool`) wins over the last-dot rule. A name needs a
    letter, digit or underscore: an id such as `:::0` has none, and gives "" (no call).
    """
    body = call_id[len(_ID_PREFIX):] if call_id.startswith(_ID_PREFIX) else call_id
    head, colon, _ = body.rpartition(":")
    if not colon:
        return body if _IDENTIFIER_CHAR.search(body) else ""
    declared = [n for n in tool_names if head == n or head.endswith("." + n)]
    if declared:
        return max(declared, key=len)
    name = head.rpartition(".")[2]
    return name if _IDENTIFIER_CHAR.search(name) else ""


def lex(text: str) -> list[Segment]:
    """Split text into text pieces and markers."""
    segments: list[Segment] = []
    pos = 0
    for match in _MARKER_RE.finditer(text):
        if match.start() > pos:
            segments.append(text[pos:match.start()])
        segments.append(MARKER_STRINGS[match.group()])
        pos = match.end()
    if pos < len(text):
        segments.append(text[pos:])
    return segments


def _marker_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that could be the start of a marker."""
    start = max(0, len(text) - _MAX_MARKER_LEN + 1)
    pos = text.find("<", start)
    while pos != -1:  # every marker starts with "<": only those positions can start one
        if text[pos:] in _PROPER_PREFIXES:
            return len(text) - pos
        pos = text.find("<", pos + 1)
    return 0


class _IncrementalLexer:
    """`lex` over a stream: holds back a tail that may be the start of a split marker."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, text: str) -> list[Segment]:
        segments = lex(self._held + text)
        self._held = ""
        if segments and isinstance(segments[-1], str):
            k = _marker_prefix_len(segments[-1])
            if k:
                self._held = segments[-1][-k:]
                segments[-1] = segments[-1][:-k]
                if not segments[-1]:
                    segments.pop()
        return segments

    def flush(self) -> list[Segment]:
        held, self._held = self._held, ""
        return [held] if held else []


class _MarkerGuard:
    """Drops any `>` that would complete a marker string in one output channel.

    Dropping a stray marker joins the text around it, and that join can spell a marker
    (`<|tool_call` + dropped marker + `_end|>`). Defined per character, so it is chunking-invariant.
    """

    def __init__(self) -> None:
        self._tail = ""  # last characters written to the channel

    def push(self, text: str) -> str:
        if ">" not in text:
            self._remember(text)
            return text
        out: list[str] = []
        for piece in text.split(">")[:-1]:
            out.append(piece)
            self._remember(piece)
            completes = self._tail.endswith("|") and any((self._tail + ">").endswith(m) for m in MARKER_STRINGS)
            if not completes:
                out.append(">")
                self._remember(">")
        last = text.rpartition(">")[2]
        out.append(last)
        self._remember(last)
        return "".join(out)

    def _remember(self, text: str) -> None:
        self._tail = (self._tail + text[-_MAX_MARKER_LEN:])[-_MAX_MARKER_LEN:]


class _ArgumentStream:
    """One call's arguments: guarded, leading and trailing whitespace stripped, never capped."""

    def __init__(self) -> None:
        self._guard = _MarkerGuard()
        self._started = False
        self._pending_space = ""

    def push(self, text: str) -> str:
        text = self._guard.push(text)
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        if not text:
            return ""
        body = text.rstrip()
        if not body:
            self._pending_space += text
            return ""
        out = self._pending_space + body
        self._pending_space = text[len(body):]
        return out


class _State(enum.Enum):
    CONTENT = enum.auto()
    SECTION = enum.auto()
    CALL_ID = enum.auto()
    ARGUMENTS = enum.auto()
    SKIP_CALL = enum.auto()


class _CallMachine:
    """The grammar of K2 tool-call output over lexed segments; emits deltas."""

    def __init__(self, tool_names: Iterable[str]) -> None:
        self._tool_names = tuple(tool_names)
        self._state = _State.CONTENT
        self._content = _MarkerGuard()
        self._id_guard = _MarkerGuard()
        self._id_text: list[str] = []
        self._arguments = _ArgumentStream()
        self.num_calls = 0
        self.has_tool_section = False
        self.ends_in_tool_section = False

    def push(self, segments: list[Segment]) -> list[Delta]:
        deltas: list[Delta] = []
        for seg in segments:
            if isinstance(seg, Marker):
                self._on_marker(seg, deltas)
            else:
                self._on_text(seg, deltas)
        return deltas

    def _on_text(self, text: str, deltas: list[Delta]) -> None:
        if self._state is _State.CONTENT:
            text = self._content.push(text)
            if text:
                deltas.append(ContentDelta(text))
                self.ends_in_tool_section &= text.isspace()
        elif self._state is _State.CALL_ID:
            self._id_text.append(self._id_guard.push(text))
        elif self._state is _State.ARGUMENTS:
            fragment = self._arguments.push(text)
            if fragment:
                deltas.append(ToolCallDelta(self.num_calls - 1, arguments=fragment))
        # SECTION and SKIP_CALL: text outside any call inside a section is dropped.

    def _on_marker(self, marker: Marker, deltas: list[Delta]) -> None:
        state = self._state
        if marker is Marker.SECTION_BEGIN and state is _State.CONTENT:
            self._state = _State.SECTION
            self.has_tool_section = self.ends_in_tool_section = True
        elif marker is Marker.CALL_BEGIN and state is not _State.CONTENT:
            self._begin_call()
        elif marker is Marker.ARGUMENT_BEGIN and state is _State.CALL_ID:
            self._begin_arguments(deltas)
        elif marker is Marker.CALL_END and state is not _State.CONTENT:
            self._state = _State.SECTION
        elif marker is Marker.SECTION_END and state is not _State.CONTENT:
            self._state = _State.CONTENT
        # Anything else is a stray marker: dropped.

    def _begin_call(self) -> None:
        self._state = _State.CALL_ID
        self._id_guard = _MarkerGuard()
        self._id_text = []

    def _begin_arguments(self, deltas: list[Delta]) -> None:
        call_id = "".join(self._id_text).strip()
        name = tool_call_name(call_id, self._tool_names)
        if not name:
            self._state = _State.SKIP_CALL
            return
        deltas.append(ToolCallDelta(self.num_calls, id=call_id, name=name))
        self.num_calls += 1
        self._arguments = _ArgumentStream()
        self._state = _State.ARGUMENTS


def _coalesce(deltas: list[Delta]) -> list[Delta]:
    """Merge adjacent content deltas and adjacent argument fragments of one call."""
    out: list[Delta] = []
    for d in deltas:
        prev = out[-1] if out else None
        if isinstance(d, ContentDelta) and isinstance(prev, ContentDelta):
            out[-1] = ContentDelta(prev.text + d.text)
        elif (isinstance(d, ToolCallDelta) and isinstance(prev, ToolCallDelta)
              and d.id is None and prev.index == d.index):
            out[-1] = ToolCallDelta(prev.index, prev.id, prev.name, prev.arguments + d.arguments)
        else:
            out.append(d)
    return out


class _Collector:
    """Accumulates deltas into the pieces of a ParsedOutput."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if isinstance(d, ContentDelta):
                self._content.append(d.text)
            elif d.id is not None:
                self._calls.append((d.id, d.name or "", [d.arguments]))
            else:
                self._calls[d.index][2].append(d.arguments)

    def result(self, machine: _CallMachine) -> ParsedOutput:
        calls = [ToolCall(i, n, "".join(a), k) for k, (i, n, a) in enumerate(self._calls)]
        return ParsedOutput("".join(self._content), calls, machine.has_tool_section,
                            machine.ends_in_tool_section and bool(calls))


class StreamingToolParser:
    """Incremental K2 tool-call parser: feed detokenized deltas, get content and tool-call deltas.

    `tool_names`: the request's declared function names (optional; resolves dotted names).
    After `finish()`, `result()` returns the same ParsedOutput that `parse_tool_calls` gives.
    """

    def __init__(self, tool_names: Iterable[str] = ()) -> None:
        self._lexer = _IncrementalLexer()
        self._machine = _CallMachine(tool_names)
        self._collector = _Collector()
        self._finished = False

    def feed(self, delta_text: str) -> list[Delta]:
        """Parse the next piece of detokenized text."""
        if self._finished:
            raise RuntimeError("StreamingToolParser.feed() called after finish()")
        return self._emit(self._machine.push(self._lexer.push(delta_text)))

    def finish(self) -> list[Delta]:
        """End of output: release held-back text; a cut-off call keeps the arguments that arrived."""
        if self._finished:
            return []
        self._finished = True
        return self._emit(self._machine.push(self._lexer.flush()))

    def result(self) -> ParsedOutput:
        """Everything parsed so far, as one ParsedOutput."""
        return self._collector.result(self._machine)

    def _emit(self, deltas: list[Delta]) -> list[Delta]:
        deltas = _coalesce(deltas)
        self._collector.add(deltas)
        return deltas


def parse_tool_calls(text: str, tool_names: Iterable[str] = ()) -> ParsedOutput:
    """Parse a whole model output into content and tool calls."""
    machine = _CallMachine(tool_names)
    collector = _Collector()
    collector.add(machine.push(lex(text)))
    return collector.result(machine)


def finish_reason(parsed: ParsedOutput, engine_reason: str = "stop") -> str:
    """OpenAI finish_reason: `tool_calls` when a naturally stopped output ends in a tool-call section
    with at least one call; otherwise the engine's reason (`length` stays `length`: a call may be cut)."""
    if engine_reason == "stop" and parsed.ends_in_tool_section and parsed.tool_calls:
        return "tool_calls"
    return engine_reason
