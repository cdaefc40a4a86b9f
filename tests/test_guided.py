"""Structured output: JSON schema / object, regex and K2 tool calls always parse and validate.

The grammar is driven by random logits (any model could produce them) and, end to end, by the real tiny
K2 checkpoint through the Engine."""

import json
import re

import jsonschema
import pytest
import torch

from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.guided import GuidedDecoding
from k2serve.worker.request import GuidedSpec, RequestRejected, SamplingParams
from k2serve.worker.vocab import TOOL_MARKERS, Vocab

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "ok", "n"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}},
     "required": ["color", "tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 9, "minimum": -9},
                                                                                 "y": {"type": "null"}}, "required": ["x", "y"]}},
     "required": ["point"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get-time.v2", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}
TOOLS = (WEATHER, CLOCK)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def vocab(model_dir):
    return Vocab.from_model_dir(model_dir, 1280)


@pytest.fixture(scope="module")
def guided(vocab):
    return GuidedDecoding(vocab, vocab.size)


def drive(guided, spec, seed, bias=None, max_steps=400):
    """Sample from masked random logits until the grammar terminates; the token ids generated."""
    guide = guided.new_guide(spec)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_steps):
        logits = torch.randn(2, guided.vocab_size, generator=gen) * 3  # row 0 unguided
        if bias:
            for t, b in bias.items():
                logits[1, t] += b
        guided.apply_masks(logits, [None, guide])
        assert torch.isfinite(logits[0]).all()
        token = int(torch.softmax(logits[1], -1).multinomial(1, generator=gen))
        assert guide.accept(token)
        out.append(token)
        if guide.is_terminated:
            return out
    raise AssertionError(f"grammar did not terminate in {max_steps} steps")


def decode(vocab, ids):
    return b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8", errors="strict")


def parse_tool_calls(vocab, ids, tools):
    """Validate K2 tool-call token structure; [(name, idx, args)]. Ends with the section end + a stop id."""
    m = {name: vocab.id_of(name) for name in TOOL_MARKERS}
    begin, end, call_b, arg_b, call_e = (m[n] for n in TOOL_MARKERS)
    assert ids[0] == begin and ids[-2] == end and ids[-1] in vocab.stop_token_ids, ids
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls, body = [], ids[1:-2]
    while body:
        assert body[0] == call_b
        j, k = body.index(arg_b), body.index(call_e)
        call_id = decode(vocab, body[1:j])
        match = re.fullmatch(r"functions\.([\w.\-]+):(\d+)", call_id)
        assert match, call_id
        args = json.loads(decode(vocab, body[j + 1:k]))
        jsonschema.validate(args, schemas[match.group(1)])
        calls.append((match.group(1), int(match.group(2)), args))
        body = body[k + 1:]
    assert calls
    return calls


@pytest.mark.parametrize("schema_idx", range(len(SCHEMAS)))
def test_json_schema_output_parses_and_validates(guided, vocab, schema_idx):
    schema = SCHEMAS[schema_idx]
    for seed in range(3):
        ids = drive(guided, GuidedSpec("json_schema", schema=json.dumps(schema)), seed)
        assert ids[-1] in vocab.stop_token_ids
        jsonschema.validate(json.loads(decode(vocab, ids[:-1])), schema)


def test_json_object_and_regex(guided, vocab):
    stop_soon = {vocab.token_bytes.index(t): 6.0 for t in (b"}", b'"', b'"}')}
    ids = drive(guided, GuidedSpec("json_object"), 0, bias=stop_soon)
    assert isinstance(json.loads(decode(vocab, ids[:-1])), dict)
    for seed in range(3):
        ids = drive(guided, GuidedSpec("regex", regex=r"[a-c]{3}-\d\d"), seed)
        assert re.fullmatch(r"[a-c]{3}-\d\d", decode(vocab, ids[:-1]))


@pytest.mark.parametrize("mode", ["named", "required"])
def test_forced_tool_call_has_valid_id_and_schema_valid_arguments(guided, vocab, mode):
    for seed in range(3):
        spec = GuidedSpec("tool_call", tools=TOOLS, mode=mode, name="get-time.v2" if mode == "named" else None,
                          first_index=4)
        bias = {vocab.id_of("<|tool_calls_section_end|>"): 4.0}
        calls = parse_tool_calls(vocab, drive(guided, spec, seed, bias=bias), TOOLS)
        assert [c[1] for c in calls] == list(range(4, 4 + len(calls))), "ids count calls across the conversation"
        if mode == "named":
            assert [c[0] for c in calls] == ["get-time.v2"]


def test_required_mode_ends_after_the_most_parallel_calls(guided, vocab):
    """A model that never closes the section still gets a finished, parseable one (MAX_PARALLEL_CALLS calls)."""
    from k2serve.worker.guided import MAX_PARALLEL_CALLS

    spec = GuidedSpec("tool_call", tools=TOOLS, mode="required", first_index=0)
    bias = {vocab.id_of("<|tool_calls_section_end|>"): -1e9, vocab.id_of("<|tool_call_begin|>"): 5.0}
    calls = parse_tool_calls(vocab, drive(guided, spec, 0, bias=bias, max_steps=4000), TOOLS)
    assert [c[1] for c in calls] == list(range(MAX_PARALLEL_CALLS))


def test_auto_mode_gives_free_text_or_a_valid_call(guided, vocab):
    begin = vocab.id_of("<|tool_calls_section_begin|>")
    stop = vocab.id_of("<|im_end|>")
    markers = {vocab.id_of(n) for n in TOOL_MARKERS}
    spec = GuidedSpec("tool_call", tools=TOOLS, mode="auto")
    # no trigger: free text without any marker, ended by a stop token
    ids = drive(guided, spec, 0, bias={begin: -1e9, stop: 7.0})
    assert not markers & set(ids) and ids[-1] in vocab.stop_token_ids
    # triggered after some text: everything from the section begin is a valid call section
    ids = drive(guided, spec, 1, bias={begin: 7.0, vocab.id_of("<|tool_calls_section_end|>"): 4.0})
    start = ids.index(begin)
    assert not markers & set(ids[:start])
    parse_tool_calls(vocab, ids[start:], TOOLS)


def test_grammars_compiled_once_per_spec_and_bad_specs_rejected(guided):
    a = GuidedSpec("json_schema", schema={"type": "object", "properties": {"k": {"type": "integer"}}})
    b = GuidedSpec("json_schema", schema=json.dumps({"type": "object", "properties": {"k": {"type": "integer"}}}))
    assert guided.compile(a) is guided.compile(a)
    assert guided.compile(b) is guided.compile(b)
    with pytest.raises(RequestRejected, match="not valid JSON"):
        guided.new_guide(GuidedSpec("json_schema", schema="{nope"))
    with pytest.raises(RequestRejected, match="cannot compile the regex"):
        guided.new_guide(GuidedSpec("regex", regex="(unclosed"))
    with pytest.raises(RequestRejected, match="not among the tools"):
        guided.new_guide(GuidedSpec("tool_call", tools=TOOLS, mode="named", name="nope"))


def test_engine_with_tiny_model_json_and_tool_call(model_dir, vocab):
    engine = Engine.from_model_dir(model_dir, EngineConfig(num_kv_blocks=64, max_model_len=256))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "c": {"enum": ["ab", "cd"]}},
              "required": ["ok", "c"]}
    json_params = SamplingParams(temperature=0.8, seed=1, max_tokens=60, guided=GuidedSpec("json_schema", schema=schema))
    tool_params = SamplingParams(temperature=0.8, seed=2, max_tokens=60,
                                 guided=GuidedSpec("tool_call", tools=TOOLS, mode="named", name="get-time.v2"))
    prompt = [vocab.id_of("<|im_user|>"), 100, 200, 300, vocab.id_of("<|im_middle|>")]
    json_out, tool_out, free = engine.generate([prompt, prompt, prompt],
                                               [json_params, tool_params, SamplingParams(temperature=0, max_tokens=5)])
    assert json_out[-1] in vocab.stop_token_ids
    jsonschema.validate(json.loads(decode(vocab, json_out[:-1])), schema)
    assert [c[0] for c in parse_tool_calls(vocab, tool_out, TOOLS)] == ["get-time.v2"]
    assert len(free) <= 5


def test_a_grammar_the_vocabulary_cannot_satisfy_is_the_requests_fault(model_dir, vocab):
    """A schema whose only strings need a control byte (no K2 token produces one): the mask leaves no
    token, the request ends with a 400-status error (not a 500, which the router counts against the
    worker group) and its blocks come back."""
    engine = Engine.from_model_dir(model_dir, EngineConfig(num_kv_blocks=64, max_model_len=256))
    free = engine.scheduler.kv_cache.num_free_blocks
    schema = {"type": "string", "pattern": "^\u0001$"}
    engine.add_request("r", [vocab.id_of("<|im_user|>"), 100, vocab.id_of("<|im_middle|>")],
                       SamplingParams(max_tokens=8, guided=GuidedSpec("json_schema", schema=json.dumps(schema))))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    last = outputs[-1]
    assert last.finish_reason == "error" and last.error_status == 400 and "cannot be produced" in last.error
    assert engine.scheduler.kv_cache.num_free_blocks == free
