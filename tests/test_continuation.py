"""A continuation (GenerateRequest.output_token_ids) goes on exactly where the interrupted request stopped.

When a group fails mid-stream the router re-sends the request to another group with the tokens already
streamed. The engine must then produce what the uninterrupted request would have: the same greedy tokens,
the same seeded draws, the same penalties and grammar state, counts that include the earlier tokens, and
no token reported twice. Checked against uninterrupted runs of the same engine (fake model: exact)."""

import pytest

from k2serve.worker.request import GuidedSpec, RequestRejected, SamplingParams

from test_engine import STOP, fake_reference, make_fake_engine

PROMPT = [3, 9, 4, 11, 2]


def run(engine, request_id, prompt, params, output_ids=()):
    """Every output of one request, run alone to the end."""
    engine.add_request(request_id, prompt, params, output_ids)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def tokens(outs):
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, top_k=20, presence_penalty=1.5, frequency_penalty=0.5,
                   repetition_penalty=1.3, max_tokens=12, ignore_eos=True),
], ids=["greedy", "seeded", "penalties"])
def test_a_continuation_produces_the_rest_of_the_uninterrupted_run(params):
    whole = tokens(run(make_fake_engine(), "w", PROMPT, params))
    assert len(whole) == 12
    for cut in (1, 5, 11):
        engine = make_fake_engine()
        outs = run(engine, "c", PROMPT, params, whole[:cut])
        assert tokens(outs) == whole[cut:], cut
        last = outs[-1]
        assert last.finished and last.finish_reason == "length"
        assert (last.prompt_tokens, last.completion_tokens) == (len(PROMPT), 12)
        assert engine.scheduler.kv_cache.num_free_blocks == 256
    if params.temperature == 0:
        assert whole == fake_reference(PROMPT, 12)


def test_min_tokens_counts_the_tokens_generated_before():
    bias = {STOP: 100.0}  # the model wants to stop at once
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias=bias)
    whole = tokens(run(make_fake_engine(), "w", PROMPT, params))
    assert whole[-1] == STOP and len(whole) == 5
    outs = run(make_fake_engine(), "c", PROMPT, params, whole[:2])
    assert tokens(outs) == whole[2:] and outs[-1].finish_reason == "stop"


def test_logprobs_belong_to_the_new_tokens_only():
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=1)
    whole = run(make_fake_engine(), "w", PROMPT, params)
    expected = [lp for o in whole for lp in o.new_logprobs][2:]
    outs = run(make_fake_engine(), "c", PROMPT, params, tokens(whole)[:2])
    got = [lp for o in outs for lp in o.new_logprobs]
    assert [lp.token_id for lp in got] == tokens(outs) == [lp.token_id for lp in expected]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in expected])


def test_cached_tokens_count_only_the_prompt():
    engine = make_fake_engine()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    whole = tokens(run(engine, "w", PROMPT * 4, params))  # its blocks stay in the prefix cache
    outs = run(engine, "c", PROMPT * 4, params, whole[:15])
    assert tokens(outs) == whole[15:]
    assert outs[-1].cached_tokens <= len(PROMPT * 4) and outs[-1].cached_tokens > 0


def test_a_continuation_that_already_ended_finishes_at_once():
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    whole = tokens(run(make_fake_engine(), "w", PROMPT, params))
    engine = make_fake_engine()
    outs = run(engine, "c", PROMPT, params, whole)
    assert [(o.finished, o.finish_reason, o.new_token_ids, o.completion_tokens) for o in outs] == \
        [(True, "length", [], 6)]
    stopped = run(engine, "s", PROMPT, SamplingParams(temperature=0, max_tokens=6), [whole[0], STOP])
    assert [(o.finish_reason, o.stop_token_id, o.new_token_ids) for o in stopped] == [("stop", STOP, [])]
    assert not engine.has_unfinished() and engine.scheduler.kv_cache.num_free_blocks == 256


def test_a_continuation_past_the_end_or_outside_the_vocabulary_is_rejected():
    engine = make_fake_engine()
    with pytest.raises(RequestRejected, match="after the request ended") as e:
        engine.add_request("c", PROMPT, SamplingParams(temperature=0, max_tokens=2), [1, 2, 3])
    assert e.value.status == 400
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        engine.add_request("v", PROMPT, SamplingParams(max_tokens=4), [1, 999])
    assert not engine.has_unfinished()


def test_the_grammar_resumes_from_the_tokens_generated_before():
    letters = "abcdefghijklmnopqrstuvwxyz"
    spec = GuidedSpec(kind="regex", regex="[a-f]{3}x[a-f]{4}")
    params = SamplingParams(temperature=0, max_tokens=20, guided=spec)
    whole = tokens(run(make_fake_engine(), "w", PROMPT, params))
    text = "".join(letters[t % 26] for t in whole if t != STOP)
    assert len(text) == 8 and text[3] == "x"
    outs = run(make_fake_engine(), "c", PROMPT, params, whole[:4])
    assert tokens(outs) == whole[4:]
    with pytest.raises(RequestRejected, match="grammar"):  # 'z' is not what the grammar allows
        make_fake_engine().add_request("z", PROMPT, params, [letters.index("z")])
