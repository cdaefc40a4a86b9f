"""Tool-call id normalization of chat histories to K2's functions.NAME:IDX form."""

import copy

import pytest

from k2serve.router.errors import APIError

from k2serve.router.text.tool_ids import is_k2_tool_call_id, next_tool_call_index, normalize_tool_call_ids


def assistant(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
        for call_id, name in calls]}


def tool(call_id, content="ok"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def ids(messages):
    return [c["id"] for m in messages for c in m.get("tool_calls") or []]


def test_foreign_ids_rewritten_with_conversation_wide_index():
    history = [
        {"role": "user", "content": "hi"},
        assistant(("call_a", "get_weather"), ("call_b", "search")),
        tool("call_a"), tool("call_b"),
        assistant(("toolu_01", "get_weather")),
        tool("toolu_01"),
    ]
    out = normalize_tool_call_ids(history)
    assert ids(out) == ["functions.get_weather:0", "functions.search:1", "functions.get_weather:2"]
    assert [m["tool_call_id"] for m in out if m["role"] == "tool"] == ids(out)
    assert next_tool_call_index(history) == 3


def test_k2_ids_are_kept():
    history = [assistant(("functions.get_weather:0", "get_weather")), tool("functions.get_weather:0"),
               assistant(("functions.my.tool:1", "my.tool")), tool("functions.my.tool:1")]
    assert normalize_tool_call_ids(history) == history
    assert next_tool_call_index(history) == 2


def test_input_is_never_mutated():
    history = [assistant(("call_a", "f")), tool("call_a")]
    before = copy.deepcopy(history)
    out = normalize_tool_call_ids(history)
    assert history == before
    assert out[0] is not history[0] and out[0]["tool_calls"][0] is not history[0]["tool_calls"][0]


def test_id_with_the_wrong_name_or_no_index_is_rewritten():
    history = [assistant(("functions.search:0", "get_weather"), ("functions.search", "search"),
                         ("search:2", "search"), (None, "f"))]
    assert ids(normalize_tool_call_ids(history)) == [
        "functions.get_weather:0", "functions.search:1", "functions.search:2", "functions.f:3"]


def test_mixed_history_never_reuses_a_kept_id():
    history = [assistant(("call_x", "f")), tool("call_x"), assistant(("functions.f:0", "f")),
               tool("functions.f:0")]
    out = normalize_tool_call_ids(history)
    assert ids(out) == ["functions.f:1", "functions.f:0"]
    assert [m["tool_call_id"] for m in out if m["role"] == "tool"] == ["functions.f:1", "functions.f:0"]
    assert next_tool_call_index(history) == 2


def test_kept_index_advances_the_counter():
    history = [assistant(("functions.f:4", "f")), assistant(("c1", "g"))]
    assert ids(normalize_tool_call_ids(history)) == ["functions.f:4", "functions.g:5"]
    assert next_tool_call_index(history) == 6


def test_reused_foreign_id_follows_the_latest_call():
    history = [assistant(("call_1", "f")), tool("call_1", "first"),
               assistant(("call_1", "g")), tool("call_1", "second")]
    out = normalize_tool_call_ids(history)
    assert [m["tool_call_id"] for m in out if m["role"] == "tool"] == ["functions.f:0", "functions.g:1"]


def test_unknown_tool_message_id_left_alone_and_empty_history():
    history = [{"role": "tool", "tool_call_id": "orphan", "content": "x"}]
    assert normalize_tool_call_ids(history) == history
    assert normalize_tool_call_ids([]) == [] and next_tool_call_index([]) == 0


def test_missing_function_name_is_a_clear_error():
    with pytest.raises(APIError, match=r"messages\[0\].tool_calls\[0\] has no function name"):
        normalize_tool_call_ids([assistant(("call_a", ""))])


def test_is_k2_tool_call_id():
    assert is_k2_tool_call_id("functions.a-b.c:12", "a-b.c")
    assert not is_k2_tool_call_id("functions.f:x", "f")
    assert not is_k2_tool_call_id(None, "f")
