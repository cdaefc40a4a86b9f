"""K2 tool-call parsing: every pitfall of docs/k2-format.md (Tool calls), whole and streamed in many chunkings."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.router.text.tool_parser import (
    MARKER_STRINGS,
    ContentDelta,
    ParsedOutput,
    StreamingToolParser,
    ToolCall,
    ToolCallDelta,
    finish_reason,
    parse_tool_calls,
    tool_call_name,
)

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(call_id: str, args: str) -> str:
    return f"{CB}{call_id}{AB}{args}{CE}"


def chars(text: str) -> list[str]:
    return list(text)


def tokens(text: str) -> list[str]:
    """Markers as single tokens, text in pieces of 1-3 characters, like a detokenizer emits."""
    rng = random.Random(len(text))
    out: list[str] = []
    pos = 0
    while pos < len(text):
        marker = next((m for m in MARKER_STRINGS if text.startswith(m, pos)), None)
        step = len(marker) if marker else rng.randint(1, 3)
        out.append(text[pos:pos + step])
        pos += step
    return out


def random_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def reconstruct(deltas: list) -> tuple[str, list[ToolCall]]:
    """Rebuild content and calls from deltas the way an OpenAI streaming client would."""
    content, calls = [], {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content.append(d.text)
        elif d.id is not None:
            assert d.index not in calls, "a call started twice"
            calls[d.index] = [d.id, d.name, d.arguments]
        else:
            calls[d.index][2] += d.arguments
    return "".join(content), [ToolCall(i, n, a, k) for k, (i, n, a) in sorted(calls.items())]


def stream(chunks: list[str], tool_names=()) -> tuple[list, ParsedOutput]:
    parser = StreamingToolParser(tool_names)
    deltas = [d for c in chunks for d in parser.feed(c)] + parser.finish()
    return deltas, parser.result()


def assert_stream_matches(text: str, tool_names=()) -> ParsedOutput:
    whole = parse_tool_calls(text, tool_names)
    chunkings = [chars(text), tokens(text), [text]] + [random_chunks(text, s) for s in range(8)]
    for chunks in chunkings:
        deltas, result = stream(chunks, tool_names)
        assert result == whole, chunks
        assert reconstruct(deltas) == (whole.content, whole.tool_calls), chunks
    return whole


def test_single_call_after_content():
    text = "Let me check." + SB + call("functions.get_weather:0", '{"city": "Beijing"}') + SE
    out = assert_stream_matches(text)
    assert out.content == "Let me check."
    assert out.tool_calls == [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}', 0)]
    assert out.has_tool_section and finish_reason(out) == "tool_calls"


def test_plain_text_has_no_section():
    out = assert_stream_matches("Hello <world> | {json} <|im_end")
    assert out == ParsedOutput("Hello <world> | {json} <|im_end", [], False, False)
    assert finish_reason(out) == "stop"


def test_whitespace_and_newlines_between_markers():
    text = f"{SB}\n  {CB} functions.f:0 \n{AB}\n {{\"a\": 1}} \n{CE}\n\n {CB}functions.g:1{AB}{{}}{CE}  \n{SE}"
    out = assert_stream_matches(text)
    assert [(c.id, c.name, c.arguments) for c in out.tool_calls] == [
        ("functions.f:0", "f", '{"a": 1}'), ("functions.g:1", "g", "{}")]
    assert out.content == ""


def test_several_calls_without_separator():
    text = SB + "".join(call(f"functions.t{i}:{i}", f'{{"i": {i}}}') for i in range(5)) + SE
    out = assert_stream_matches(text)
    assert [c.index for c in out.tool_calls] == [0, 1, 2, 3, 4]
    assert [c.arguments for c in out.tool_calls] == [f'{{"i": {i}}}' for i in range(5)]


def test_json_with_newlines_and_angle_brackets():
    args = '{\n  "html": "<div class=\\"a\\">x < y && y > z</div>",\n  "s": "<|im_end|> <|tool"\n}'
    out = assert_stream_matches(SB + call("functions.write:0", args) + SE)
    assert out.tool_calls[0].arguments == args


@pytest.mark.parametrize("call_id,name", [
    ("get_weather:0", "get_weather"),
    ("functions.get-weather:2", "get-weather"),
    ("functions.ns.tool:1", "tool"),
    ("ns.sub.tool-x:7", "tool-x"),
    ("functions.search", "search"),
    ("search", "search"),
])
def test_id_forms(call_id, name):
    out = assert_stream_matches(SB + call(call_id, "{}") + SE)
    assert (out.tool_calls[0].id, out.tool_calls[0].name) == (call_id, name)


def test_declared_dotted_name_wins():
    assert tool_call_name("functions.ns.tool:1", ["ns.tool", "tool"]) == "ns.tool"
    assert tool_call_name("functions.ns.tool:1", ["other"]) == "tool"
    out = assert_stream_matches(SB + call("functions.my.pkg.run:0", "{}") + SE, tool_names=["pkg.run"])
    assert out.tool_calls[0].name == "pkg.run"


def test_singular_section_variant():
    out = assert_stream_matches("<|tool_call_section_begin|>" + call("functions.f:0", "{}") + SE)
    assert out.has_tool_section and out.tool_calls[0].name == "f"


def test_missing_section_end_keeps_complete_calls():
    out = assert_stream_matches("x" + SB + call("functions.f:0", '{"a":1}') + call("functions.g:1", "{}"))
    assert [c.name for c in out.tool_calls] == ["f", "g"]
    assert finish_reason(out) == "tool_calls"
    assert finish_reason(out, "length") == "length"


def test_call_cut_off_mid_arguments_returns_what_arrived():
    out = assert_stream_matches(SB + call("functions.f:0", "{}") + CB + "functions.g:1" + AB + '{"path": "/tm')
    assert out.tool_calls[1] == ToolCall("functions.g:1", "g", '{"path": "/tm', 1)


def test_call_cut_off_before_arguments_is_dropped():
    out = assert_stream_matches(SB + call("functions.f:0", "{}") + CB + "functions.g:")
    assert [c.name for c in out.tool_calls] == ["f"]


@pytest.mark.parametrize("call_id", [":::0", "functions.::0", "functions.-:1", ".:0", "::", "functions.:0"])
def test_an_id_without_an_identifier_character_names_no_call(call_id):
    assert tool_call_name(call_id) == ""
    out = assert_stream_matches(SB + call(call_id, '{"a": 1}') + call("functions.f:1", "{}") + SE)
    assert [(c.name, c.index) for c in out.tool_calls] == [("f", 0)]


def test_names_with_an_identifier_character_are_kept():
    assert [tool_call_name(i) for i in ("functions.get-time.v2:0", "functions._:1", "functions.x-y:2", "f")] == \
        ["v2", "_", "x-y", "f"]


def test_call_with_empty_name_is_dropped():
    out = assert_stream_matches(SB + CB + "  " + AB + "{}" + CE + call("functions.f:1", "{}") + SE)
    assert [c.index for c in out.tool_calls] == [0] and out.tool_calls[0].name == "f"


def test_whitespace_before_section_end_does_not_leak_but_later_content_does():
    text = "A" + SB + call("functions.f:0", "{}") + "\n \n" + SE + " tail"
    out = assert_stream_matches(text)
    assert out.content == "A tail"
    assert finish_reason(out) == "stop"  # content after the section: the turn does not end in calls
    out = assert_stream_matches("A" + SB + call("functions.f:0", "{}") + "\n" + SE + "\n")
    assert out.content == "A\n" and finish_reason(out) == "tool_calls"


def test_malformed_json_returned_verbatim():
    out = assert_stream_matches(SB + call("functions.f:0", '{"a": [1, 2,, "unterminated') + SE)
    assert out.tool_calls[0].arguments == '{"a": [1, 2,, "unterminated'


def test_split_marker_is_held_back_not_leaked():
    parser = StreamingToolParser()
    assert parser.feed("Hello <|tool_calls_sec") == [ContentDelta("Hello ")]
    assert parser.feed("tion_begin|><|tool_call_be") == []
    assert parser.feed("gin|>functions.f:0<|tool_call_argument_begin|>{") == [
        ToolCallDelta(0, "functions.f:0", "f", "{")]
    assert parser.feed("}<|tool_call_e") == [ToolCallDelta(0, arguments="}")]
    assert parser.feed("nd|>") == []
    assert parser.finish() == []


def test_held_partial_marker_is_released_as_text():
    parser = StreamingToolParser()
    assert parser.feed("a <|tool") == [ContentDelta("a ")]
    assert parser.feed("box") == [ContentDelta("<|toolbox")]
    assert parser.feed(" <|tool_call") == [ContentDelta(" ")]
    assert parser.finish() == [ContentDelta("<|tool_call")]


def test_huge_arguments_stream_incrementally():
    body = '{"file": "' + "x" * 1_000_000 + '"}'
    parser = StreamingToolParser()
    parser.feed(SB + CB + "functions.write:0" + AB)
    streamed = 0
    for i in range(0, len(body), 4096):
        streamed += sum(len(d.arguments) for d in parser.feed(body[i:i + 4096]) if isinstance(d, ToolCallDelta))
        assert streamed >= i  # fragments go out as they arrive, nothing accumulates
    parser.feed(CE + SE)
    parser.finish()
    assert parser.result().tool_calls[0].arguments == body


def test_stray_markers_are_dropped_and_cannot_be_spelled_by_joins():
    text = f"a{CE}b{AB}c{SE}<|tool_call{CE}_end|>" + SB + CB + "<|tool_" + SB + "call_end|>f:0" + AB + \
        "<|tool_call" + AB + "_end|>" + CE + SE
    out = assert_stream_matches(text)
    assert_no_markers(out)
    assert out.content.startswith("abc")
    assert len(out.tool_calls) == 1


def test_feed_after_finish_raises():
    parser = StreamingToolParser()
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def assert_no_markers(out: ParsedOutput) -> None:
    fields = [out.content] + [s for c in out.tool_calls for s in (c.id, c.name, c.arguments)]
    for text in fields:
        for marker in MARKER_STRINGS:
            assert marker not in text


_PIECES = list(MARKER_STRINGS) + [
    "<|tool_call", "_end|>", "<|", "|>", ">", "<", "tool_calls_section", "_begin|>", " ", "\n", "{", "}",
    '"a"', "functions.f:0", "g:1", ".", ":", "x", "<|tool_call_argument", "<|tool_calls_section_e",
]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=40), seed=st.integers(0, 2**16))
def test_fuzz_markers_and_text_never_crash_or_leak(pieces, seed):
    text = "".join(pieces)
    whole = parse_tool_calls(text)
    assert_no_markers(whole)
    for chunks in (chars(text), random_chunks(text, seed)):
        deltas, result = stream(chunks)
        assert result == whole
        assert reconstruct(deltas) == (whole.content, whole.tool_calls)


_TEXT = st.text(alphabet=st.sampled_from(list("ab {}[]\":,<>|\n\t_-.é中")), max_size=30)
_NAME = st.text(alphabet=st.sampled_from(list("abxyz09_-")), min_size=1, max_size=8).filter(
    lambda name: name.strip("-") != "")  # a well-formed name holds a letter, digit or underscore
_SPACE = st.sampled_from(["", " ", "\n", " \n\t"])


@settings(max_examples=80, deadline=None)
@given(content=_TEXT, calls=st.lists(st.tuples(_NAME, _TEXT, _SPACE), max_size=4), space=_SPACE,
       end=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_of_well_formed_output(content, calls, space, end, seed):
    """Any content plus calls rendered in K2's format parse back to exactly that, in any chunking."""
    body = "".join(f"{ws}{CB}{ws}functions.{name}:{k}{ws}{AB}{ws}{args}{ws}{CE}"
                   for k, (name, args, ws) in enumerate(calls))
    text = content + (SB + body + space + (SE if end else "") if calls else "")
    whole = parse_tool_calls(text)
    assert whole.content == content
    assert whole.tool_calls == [ToolCall(f"functions.{n}:{k}", n, a.strip(), k) for k, (n, a, _) in enumerate(calls)]
    assert finish_reason(whole) == ("tool_calls" if calls else "stop")
    for chunks in (tokens(text), random_chunks(text, seed)):
        deltas, result = stream(chunks)
        assert result == whole and reconstruct(deltas) == (whole.content, whole.tool_calls)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(list(MARKER_STRINGS) + [
    "<|tool_call", "<|tool_calls_section", "_end|>", "_begin|>", "s_section_end|>", "|>", "<|", "f:0", " "]),
    max_size=25))
def test_fuzz_joins_around_dropped_markers_never_spell_a_marker(pieces):
    text = "".join(pieces)
    whole = parse_tool_calls(text)
    assert_no_markers(whole)
    deltas, result = stream(chars(text))
    assert result == whole
