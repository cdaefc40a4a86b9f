"""OpenAI API of the router, on uvicorn, driven by the official openai SDK, against a scripted fake worker."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from prometheus_client import CollectorRegistry

from k2serve.router.app import create_app
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.config import RouterConfig
from k2serve.router.metrics import RouterMetrics
from k2serve.router.text.tokenizer import K2Tokenizer
from router_harness import TOOL_CALL_TEXT, ListPool, ScriptedBackend, ServerThread, wait_until

MODEL = "kimi-k2-tiny"
SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather information",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "City name"}}}}}


def script(params, prompt: str) -> str:
    """Deterministic 'model': tool calls when guided to, echoes of the tool result after one."""
    if "LONG" in prompt:
        return "word " * 500
    if "STOPME" in prompt:
        return "alpha beta STOP gamma"
    if params.guided is not None and params.guided.kind == "tool_call" and params.guided.mode != "auto":
        return "Let me check." + TOOL_CALL_TEXT.format(idx=params.guided.first_index)
    if "## Return of functions.get_weather:0" in prompt and prompt.endswith("<|im_middle|>"):
        return "It is sunny in Beijing."
    if params.guided is not None and params.guided.kind in ("json_object", "json_schema"):
        return '{"answer": 42}'
    return "Hello! I am Kimi."


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    path = tiny_model_dir
    tokenizer = K2Tokenizer.from_dir(path)
    backend = ScriptedBackend(tokenizer, script)
    config = RouterConfig(model_name=MODEL).with_generation_config(path)
    metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
    app = create_app(config, ListPool([backend]), tokenizer, ChatTemplate.from_dir(path), metrics=metrics)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield backend, client, server


def test_model_card_chat_example(stack):
    backend, client, _ = stack
    resp = client.chat.completions.create(
        model=MODEL, temperature=0.6, max_tokens=256,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]}])
    assert resp.choices[0].message.content == "Hello! I am Kimi."
    assert resp.choices[0].finish_reason == "stop"
    params = backend.calls[-1]
    assert (params.temperature, params.max_tokens) == (pytest.approx(0.6), 256)
    assert backend.prompts[-1] == (f"<|im_system|>system<|im_middle|>{SYSTEM}<|im_end|><|im_user|>user<|im_middle|>"
                                   "Please give a brief self-introduction.<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert resp.usage.prompt_tokens == len(params.prompt_token_ids) and resp.usage.completion_tokens > 0


def test_default_temperature_comes_from_generation_config(stack):
    backend, client, _ = stack
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert backend.calls[-1].temperature == pytest.approx(0.6)
    assert backend.calls[-1].guided is None


def test_model_card_tool_call_loop(stack):
    backend, client, _ = stack
    messages = [{"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]
    finish_reason, turn = None, 0
    while finish_reason is None or finish_reason == "tool_calls":
        choice = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0.6, tools=[WEATHER_TOOL],
            tool_choice="required" if turn == 0 else "auto").choices[0]
        finish_reason = choice.finish_reason
        if turn == 0:
            assert finish_reason == "tool_calls"
            guided = backend.calls[-1].guided
            assert (guided.kind, guided.mode, guided.first_index) == ("tool_call", "required", 0)
            call = choice.message.tool_calls[0]
            assert (call.id, call.function.name, json.loads(call.function.arguments)) == \
                ("functions.get_weather:0", "get_weather", {"city": "Beijing"})
            assert choice.message.content == "Let me check."
        messages.append(choice.message)
        for call in choice.message.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                             "content": json.dumps({"weather": "Sunny"})})
        turn += 1
        assert turn < 4
    assert choice.message.content == "It is sunny in Beijing." and finish_reason == "stop"
    assert backend.calls[-1].guided.mode == "auto"  # triggered structure on by default
    assert ('<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}'
            '<|im_end|><|im_assistant|>assistant<|im_middle|>') in backend.prompts[-1]
    assert backend.prompts[-1].startswith("<|im_system|>tool_declare<|im_middle|>[")


def test_history_ids_are_normalized_and_named_choice(stack):
    backend, client, _ = stack
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "rainy"},
                {"role": "user", "content": "again"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert "functions.get_weather:0" in backend.prompts[-1] and "call_abc" not in backend.prompts[-1]
    guided = backend.calls[-1].guided
    assert (guided.mode, guided.name, guided.first_index) == ("named", "get_weather", 1)
    assert resp.choices[0].message.tool_calls[0].id == "functions.get_weather:1"


def test_streaming_tool_calls_and_usage(stack):
    backend, client, _ = stack
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather in Beijing?"}], tools=[WEATHER_TOOL],
        tool_choice="required", stream=True, stream_options={"include_usage": True})
    content, args, ids, finish, usage = "", "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                ids += [call.id] if call.id else []
                args += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (content, ids, json.loads(args), finish) == ("Let me check.", ["functions.get_weather:0"],
                                                         {"city": "Beijing"}, "tool_calls")
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_tool_choice_none_drops_markers(stack):
    backend, client, _ = stack
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          tools=[WEATHER_TOOL], tool_choice="none")
    assert backend.calls[-1].guided is None
    assert resp.choices[0].message.tool_calls is None and "<|" not in (resp.choices[0].message.content or "")


def test_stop_strings_truncate_and_cancel(stack):
    backend, client, _ = stack
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "STOPME"}], stop=["STOP"])
    assert resp.choices[0].message.content == "alpha beta " and resp.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "STOPME"}],
                                            stop="STOP", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha beta "


def test_n_seed_logprobs_and_response_format(stack):
    backend, client, _ = stack
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, seed=7,
                                          logprobs=True, top_logprobs=2, max_completion_tokens=3,
                                          response_format={"type": "json_object"}, presence_penalty=0.5)
    assert len(resp.choices) == 2 and {c.finish_reason for c in resp.choices} == {"length"}
    assert sorted(p.seed for p in backend.calls[-2:]) == [7, 8]
    assert backend.calls[-1].max_tokens == 3 and backend.calls[-1].presence_penalty == 0.5
    assert backend.calls[-1].guided.kind == "json_object" and backend.calls[-1].logprobs == 2
    lp = resp.choices[0].logprobs.content
    assert len(lp) == 3 and lp[0].logprob == -0.25 and len(lp[0].top_logprobs) == 2
    assert resp.usage.completion_tokens == 6
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(backend.calls[-1].guided.json_schema) == schema
    assert json.loads(resp.choices[0].message.content) == {"answer": 42}


def test_completions_and_models(stack):
    backend, client, _ = stack
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, logprobs=1)
    assert resp.choices[0].finish_reason == "length" and len(resp.choices[0].logprobs.tokens) == 4
    assert "<|im_" not in backend.prompts[-1]
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=[1, 2, 3], max_tokens=50, stream=True) if c.choices)
    assert text == "Hello! I am Kimi."
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_client_disconnect_cancels_worker_request(stack):
    backend, _, server = stack
    backend.delay = 0.01
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=10, json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "LONG"}]}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
            rid = backend.calls[-1].request_id
            assert rid in backend.active
    finally:
        backend.delay = 0.0
    assert wait_until(lambda: rid not in backend.active)
    assert rid in backend.cancelled
    registry = server.server.config.app.state.ctx.metrics.registry
    assert registry.get_sample_value("k2serve_router_client_disconnects_total",
                                     {"endpoint": "/v1/chat/completions"}) == 1


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "LONG", "max_tokens": 400}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 400, "messages": [{"role": "user", "content": "LONG"}]})])
def test_a_client_leaving_a_non_streamed_request_cancels_its_worker_request(stack, path, body):
    backend, _, server = stack
    registry = server.server.config.app.state.ctx.metrics.registry

    def count(name, **labels):
        return registry.get_sample_value(name, labels) or 0

    before = (count("k2serve_router_client_disconnects_total", endpoint=path),
              count("k2serve_router_requests_total", endpoint=path, model=MODEL, status="499"))
    backend.delay = 0.01  # 500 words: seconds of generation, far beyond the client's patience
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + path, json=body, timeout=0.5)
        rid = backend.calls[-1].request_id
        assert wait_until(lambda: rid not in backend.active)
    finally:
        backend.delay = 0.0
    assert rid in backend.cancelled
    assert wait_until(lambda: (count("k2serve_router_client_disconnects_total", endpoint=path),
                               count("k2serve_router_requests_total", endpoint=path, model=MODEL, status="499"))
                      == (before[0] + 1, before[1] + 1))


def test_a_client_leaving_while_it_sends_its_body_is_a_499_not_an_error(stack, caplog):
    import socket

    _, _, server = stack
    registry = server.server.config.app.state.ctx.metrics.registry

    def count(status):
        return registry.get_sample_value("k2serve_router_requests_total",
                                         {"endpoint": "/v1/completions", "model": MODEL, "status": status}) or 0

    before = count("499")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"model\": ")
    assert wait_until(lambda: count("499") == before + 1)
    assert count("500") == 0
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]


def test_unknown_paths_share_one_metrics_label(stack):
    _, _, server = stack
    for i in range(3):
        assert httpx.get(server.url + f"/v1/scan-{i}").status_code == 404
    text = httpx.get(server.url + "/metrics").text
    assert 'k2serve_router_requests_total{endpoint="other",model="kimi-k2-tiny",status="404"} 3.0' in text
    assert "scan-" not in text


def test_request_id_header_travels(stack):
    backend, _, server = stack
    r = httpx.post(server.url + "/v1/chat/completions", headers={"x-request-id": "abc-123"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    assert backend.calls[-1].request_id == "abc-123" and r.json()["id"] == "chatcmpl-abc-123"


def test_metrics_count_requests_and_tokens(stack):
    backend, client, server = stack
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    assert 'k2serve_router_requests_total{endpoint="/v1/chat/completions",model="kimi-k2-tiny",status="200"}' in text
    assert "k2serve_router_generation_tokens_total" in text and "k2serve_router_time_to_first_token_seconds" in text


# ---------------------------------------------------------------- real worker (gRPC + AsyncEngine, tiny checkpoint)

from k2serve.router.pool.worker_client import WorkerClient  # noqa: E402
from router_harness import WorkerThread  # noqa: E402

ENUM_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather information",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Beijing", "Shanghai"]}}}}}


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    with WorkerThread(tiny_model_dir) as worker:
        config = RouterConfig().with_generation_config(tiny_model_dir)
        app = create_app(config, ListPool([WorkerClient(worker.address)]), K2Tokenizer.from_dir(tiny_model_dir),
                         ChatTemplate.from_dir(tiny_model_dir))
        with ServerThread(app) as server:
            yield worker, server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_real_model_card_chat(real):
    _, _, client = real
    resp = client.chat.completions.create(
        model="kimi-k2-tiny", temperature=0.6, max_tokens=16,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]}])
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert "<|im_end|>" not in choice.message.content and 0 < resp.usage.completion_tokens <= 16


def test_real_tool_call_loop(real):
    _, _, client = real
    messages = [{"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]
    first = client.chat.completions.create(model="kimi-k2-tiny", messages=messages, temperature=0.6, max_tokens=48,
                                           tools=[ENUM_WEATHER_TOOL], tool_choice="required").choices[0]
    calls = first.message.tool_calls
    assert calls and calls[0].id == "functions.get_weather:0" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("Beijing", "Shanghai")  # schema-valid despite random weights
    messages.append(first.message)
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                         "content": json.dumps({"weather": "Sunny"})})
    second = client.chat.completions.create(model="kimi-k2-tiny", messages=messages, temperature=0.6, max_tokens=8,
                                            tools=[ENUM_WEATHER_TOOL]).choices[0]
    assert second.finish_reason in ("stop", "length", "tool_calls")


def test_real_streaming_with_usage(real):
    _, _, client = real
    chunks = list(client.chat.completions.create(model="kimi-k2-tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 8
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_real_disconnect_frees_worker_kv(real):
    worker, server, _ = real
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": "kimi-k2-tiny", "prompt": "tell me a long story", "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")

    async def load():
        client = WorkerClient(worker.address)
        try:
            return await client.get_load()
        finally:
            await client.close()
    assert wait_until(lambda: asyncio.run(load()).kv_cache_usage == 0.0 and asyncio.run(load()).num_running == 0,
                      timeout=15)


@pytest.mark.parametrize("schema", [{"not": {}}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
                                    {"enum": []}])
def test_real_unsatisfiable_response_format_is_a_400(real, schema):
    _, _, client = real
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="kimi-k2-tiny", max_tokens=8, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "s", "schema": schema}})
    assert err.value.status_code == 400 and "cannot be used for structured output" in err.value.message
