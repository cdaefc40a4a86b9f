"""The router's per-token shortcuts give exactly what the plain path gives: pre-encoded SSE frames
(router.sse) and RouterMetrics' cached label children."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics
from router.sse import OpenAIFrames, anthropic_event, anthropic_text_delta, sse

TEXTS = ["", " the", 'quote " and \\ backslash', "new\nline\ttab\r", "\x00\x1f control", "日本語 ☃ 🎉",
         "</script>", "\u2028\u2029", "\ud800 lone surrogate"]
HEAD = {"id": "cmpl-x", "object": "text_completion", "created": 1700000000, "model": "kimi-k2-tiny"}


def plain(payload) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@pytest.mark.parametrize("text", TEXTS)
def test_completion_text_frame_matches_json(text):
    choice = {"index": 3, "text": text, "logprobs": None, "finish_reason": None}
    assert OpenAIFrames(HEAD).completion_text(3, text) == plain({**HEAD, "choices": [choice]})


@pytest.mark.parametrize("usage_on_every_chunk", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_chat_content_frame_matches_json(text, usage_on_every_chunk):
    head = {"id": "chatcmpl-x", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    payload = {**head, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}
    if usage_on_every_chunk:
        payload["usage"] = None
    assert OpenAIFrames(head, usage_on_every_chunk).chat_content(0, text) == plain(payload)


def test_generic_chunks_and_usage():
    frames = OpenAIFrames(HEAD, usage_on_every_chunk=True)
    choices = [{"index": 0, "text": "", "logprobs": {"tokens": ["a"]}, "finish_reason": "length"}]
    assert frames.chunk(choices) == plain({**HEAD, "choices": choices, "usage": None})
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert frames.chunk([], usage) == plain({**HEAD, "choices": [], "usage": usage})
    assert OpenAIFrames(HEAD).chunk(choices) == plain({**HEAD, "choices": choices}) == sse({**HEAD, "choices": choices})
    with pytest.raises(ValueError, match="id/object/created/model"):
        OpenAIFrames({})


@pytest.mark.parametrize("text", TEXTS)
def test_anthropic_frames_match_json_dumps(text):
    payload = {"index": 2, "delta": {"type": "text_delta", "text": text}}
    expected = ("event: content_block_delta\ndata: "
                + json.dumps({"type": "content_block_delta", **payload}, ensure_ascii=False) + "\n\n")
    assert anthropic_text_delta(2, text) == expected == anthropic_event("content_block_delta", payload)


def sample(metrics: RouterMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_cached_children_keep_counting():
    m = RouterMetrics(CollectorRegistry(), model="k")
    for _ in range(3):
        m.tokens(generated=2)
        m.observe_itl(0.004)
    assert sample(m, "k2serve_router_generation_tokens_total", model="k") == 6
    assert sample(m, "k2serve_router_inter_token_latency_seconds_count", model="k") == 3


def test_metrics_group_series_come_back_after_removal():
    m = RouterMetrics(CollectorRegistry(), model="k")
    m.dispatched("g0")
    m.set_group_health("g0", True)
    m.remove_group("g0")
    assert sample(m, "k2serve_router_group_dispatches_total", group="g0") is None
    m.dispatched("g0")  # a cached child of the removed series would count where no one scrapes
    m.set_group_health("g0", False)
    assert sample(m, "k2serve_router_group_dispatches_total", group="g0") == 1
    assert sample(m, "k2serve_router_group_healthy", group="g0") == 0


# ---------------------------------------------------------------- the gRPC leg: built in place, read back


def outputs():
    from worker.request import RequestOutput, TokenLogprob

    lp = [TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)]), TokenLogprob(6, -2.0, [])]
    return [RequestOutput("r", [5], None, 64, 1, 0), RequestOutput("r", [5, 6], lp, 64, 3, 16),
            RequestOutput("r", [], [TokenLogprob(1, -0.5)], 64, 3, 16)]


@pytest.mark.parametrize("out", outputs())
def test_fill_chunk_writes_tokens_logprobs_and_counts(out):
    from k2serve.v1 import worker_pb2
    from worker.responses import fill_chunk

    response = worker_pb2.GenerateResponse()
    fill_chunk(response.chunk, out)
    logprobs = [worker_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                        top=[worker_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top_logprobs])
                for lp in out.new_logprobs or ()]
    assert response.chunk == worker_pb2.GenerateChunk(
        token_ids=out.new_token_ids, logprobs=logprobs, prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens)


@pytest.mark.parametrize("out", outputs())
def test_router_reads_back_tokens_logprobs_and_counts(out):
    from k2serve.v1 import worker_pb2
    from router.worker_client import TokenChunk, TokenLogprob, response_from_proto
    from worker.responses import fill_chunk

    response = worker_pb2.GenerateResponse()
    fill_chunk(response.chunk, out)
    item = response_from_proto(response)
    lps = tuple(TokenLogprob(lp.token_id, lp.logprob, tuple(lp.top_logprobs)) for lp in out.new_logprobs or ())
    assert item == TokenChunk(tuple(out.new_token_ids), lps, out.prompt_tokens, out.completion_tokens,
                              out.cached_tokens)
