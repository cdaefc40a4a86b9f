"""The router's per-token shortcuts give exactly what the plain path gives: pre-encoded SSE frames
(router.sse) and RouterMetrics' cached label children."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from k2serve.router.metrics import RouterMetrics
from k2serve.router.api.sse import OpenAIFrames, anthropic_event, anthropic_text_delta, sse

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
    m = RouterMetrics(CollectorRegistry(), model="k", max_retired_groups=1)
    m.set_circuit_state("g0", "closed")
    m.set_group_health("g0", True)
    m.remove_group("g0")
    assert sample(m, "k2serve_router_circuit_state", group="g0") is None
    m.set_circuit_state("g0", "open")  # a cached child of the removed series would count where no one scrapes
    m.set_group_health("g0", False)
    assert sample(m, "k2serve_router_circuit_state", group="g0") == 2
    assert sample(m, "k2serve_router_group_healthy", group="g0") == 0
    m.dispatched("g1")
    m.remove_group("g1")
    m.remove_group("g0")  # over the limit: the oldest group gone, g1, loses its counters
    assert sample(m, "k2serve_router_group_dispatches_total", group="g1") is None
    m.dispatched("g1")
    assert sample(m, "k2serve_router_group_dispatches_total", group="g1") == 1


# ---------------------------------------------------------------- the gRPC leg: built in place, read back


def outputs():
    from k2serve.worker.request import RequestOutput, TokenLogprob

    lp = [TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)]), TokenLogprob(6, -2.0, [])]
    return [RequestOutput("r", [5], None, 64, 1, 0), RequestOutput("r", [5, 6], lp, 64, 3, 16),
            RequestOutput("r", [], [TokenLogprob(1, -0.5)], 64, 3, 16)]


@pytest.mark.parametrize("out", outputs())
def test_fill_chunk_writes_tokens_logprobs_and_counts(out):
    from k2serve.v1 import worker_pb2
    from k2serve.worker.responses import fill_chunk

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
    from k2serve.router.pool.worker import TokenChunk, TokenLogprob
    from k2serve.router.pool.worker_client import response_from_proto
    from k2serve.worker.responses import fill_chunk

    response = worker_pb2.GenerateResponse()
    fill_chunk(response.chunk, out)
    item = response_from_proto(response)
    lps = tuple(TokenLogprob(lp.token_id, lp.logprob, tuple(lp.top_logprobs)) for lp in out.new_logprobs or ())
    assert item == TokenChunk(tuple(out.new_token_ids), lps, out.prompt_tokens, out.completion_tokens,
                              out.cached_tokens)


def test_streamed_events_reach_the_server_from_the_endpoint_itself(tiny_model_dir, monkeypatch):
    """Each SSE event goes from EventStreamResponse's loop to the server's send with no wrapper coroutine
    between them (router.app.RouterApp's layers wrap send in plain functions only), and auth and the
    request metrics still see the request. Nor do requests look up OpenTelemetry providers."""
    import asyncio
    import sys

    from k2serve.router.app import create_app
    from k2serve.router.text.chat_template import ChatTemplate
    from k2serve.router.config import RouterConfig
    from k2serve.router.text.tokenizer import K2Tokenizer
    from router_harness import ListPool, ScriptedBackend

    tokenizer = K2Tokenizer.from_dir(tiny_model_dir)
    metrics = RouterMetrics(CollectorRegistry(), model="kimi-k2-tiny")
    app = create_app(RouterConfig(model_name="kimi-k2-tiny", api_key="k"),
                     ListPool([ScriptedBackend(tokenizer, lambda params, prompt: "one two three")]), tokenizer,
                     ChatTemplate.from_dir(tiny_model_dir), metrics=metrics)
    body = json.dumps({"model": "kimi-k2-tiny", "prompt": "hi", "max_tokens": 8, "stream": True}).encode()
    otel = pytest.importorskip("opentelemetry") if hasattr(app, "_native_telemetry") else None  # FastAPI >= 0.13x
    if otel is not None:
        import opentelemetry._logs
        import opentelemetry.metrics
        import opentelemetry.trace

        def looked_up():
            raise AssertionError("a request looked up an OpenTelemetry provider")
        for module, getter in ((opentelemetry.trace, "get_tracer_provider"),
                               (opentelemetry.metrics, "get_meter_provider"),
                               (opentelemetry._logs, "get_logger_provider")):
            monkeypatch.setattr(module, getter, looked_up)

    async def request(key: str) -> tuple[list[dict], list[str]]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]}
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent, senders = [], []

        async def receive():
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # the client stays until the response ends

        async def send(message):
            sent.append(message)
            senders.append(sys._getframe(1).f_code.co_name)  # the coroutine that awaited this send

        await app(scope, receive, send)
        return sent, senders

    sent, senders = asyncio.run(request("k"))
    assert sent[0]["status"] == 200
    events = [i for i, m in enumerate(sent) if m["type"] == "http.response.body" and m["body"]]
    assert len(events) >= 4 and b"[DONE]" in sent[events[-1]]["body"]
    assert {senders[i] for i in events} == {"_stream"}
    assert sample(metrics, "k2serve_router_requests_total", endpoint="/v1/completions", model="kimi-k2-tiny",
                  status="200") == 1
    sent, _ = asyncio.run(request("wrong"))
    assert sent[0]["status"] == 401
    assert sample(metrics, "k2serve_router_requests_total", endpoint="/v1/completions", model="kimi-k2-tiny",
                  status="401") == 1


def test_a_stream_that_breaks_after_its_first_event_is_logged_and_closed(tiny_model_dir, caplog):
    import asyncio
    import logging

    from k2serve.router.app import create_app
    from k2serve.router.text.chat_template import ChatTemplate
    from k2serve.router.config import RouterConfig
    from k2serve.router.text.tokenizer import K2Tokenizer
    from k2serve.router.pool.worker import TokenChunk, WorkerLoad, WorkerModelInfo
    from router_harness import ListPool

    class BreaksMidStream:  # a Worker
        async def generate(self, params):
            yield TokenChunk((tokenizer.encode(" the")[0],), prompt_tokens=1, completion_tokens=1)
            raise RuntimeError("a bug after the first token")

        async def get_load(self, timeout=5.0):
            return WorkerLoad()

        async def get_model_info(self, timeout=10.0):
            return WorkerModelInfo("kimi-k2-tiny", 256, tokenizer.n_vocab)

        async def health(self, timeout=2.0):
            return True

        async def close(self):
            return None

    tokenizer = K2Tokenizer.from_dir(tiny_model_dir)
    app = create_app(RouterConfig(model_name="kimi-k2-tiny"), ListPool([BreaksMidStream()]), tokenizer,
                     ChatTemplate.from_dir(tiny_model_dir))
    body = json.dumps({"model": "kimi-k2-tiny", "prompt": "hi", "max_tokens": 8, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80), "headers": [(b"content-type", b"application/json")]}
    sent, pending = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="after the first token"):
        asyncio.run(app(scope, receive, send))  # the server closes the connection; the client sees a cut stream
    assert sent[0]["status"] == 200 and sent[1]["body"].startswith(b"data: ")
    assert any("unhandled error on /v1/completions" in r.getMessage() for r in caplog.records)
