"""Anthropic Messages API of the router, on uvicorn, driven by the official anthropic SDK (scripted fake worker)."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from k2serve.router.app import create_app
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.config import RouterConfig
from k2serve.router.text.tokenizer import K2Tokenizer
from router_harness import TOOL_CALL_TEXT, ListPool, ScriptedBackend, ServerThread

MODEL = "kimi-k2-tiny"
WEATHER = {"name": "get_weather", "description": "Get weather information",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def script(params, prompt: str) -> str:
    if params.guided is not None and params.guided.kind == "tool_call" and params.guided.mode != "auto":
        return TOOL_CALL_TEXT.format(idx=params.guided.first_index)
    if "## Return of functions.get_weather:0" in prompt:
        return "Sunny, 25C."
    if "STOPME" in prompt:
        return "one two END three"
    return "Hi, I am Kimi."


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    path = tiny_model_dir
    tokenizer = K2Tokenizer.from_dir(path)
    backend = ScriptedBackend(tokenizer, script)
    app = create_app(RouterConfig(model_name=MODEL, api_key="sk-test"), ListPool([backend]), tokenizer, ChatTemplate.from_dir(path))
    with ServerThread(app) as server:
        yield backend, anthropic.Anthropic(base_url=server.url, api_key="sk-test", max_retries=0)


def test_message_with_system_blocks_and_temperature_scaling(stack):
    backend, client = stack
    msg = client.messages.create(model=MODEL, max_tokens=64, extra_body={"temperature": 0.5},
                                 system=[{"type": "text", "text": "Be brief."}],
                                 messages=[{"role": "user", "content": [{"type": "text", "text": "Who are you?"}]}])
    assert msg.content[0].type == "text" and msg.content[0].text == "Hi, I am Kimi."
    assert msg.stop_reason == "end_turn" and msg.usage.input_tokens == len(backend.calls[-1].prompt_token_ids)
    assert backend.calls[-1].temperature == pytest.approx(0.3) and backend.calls[-1].max_tokens == 64
    assert backend.prompts[-1].startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user")
    client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert backend.calls[-1].temperature == pytest.approx(0.6)  # default 1.0 x 0.6


def test_streamed_message(stack):
    backend, client = stack
    with client.messages.stream(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hi, I am Kimi." and final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_stream_event_sequence(stack):
    backend, client = stack
    r = httpx.post(str(client.base_url).rstrip("/") + "/v1/messages", headers={"x-api-key": "sk-test"},
                   json={"model": MODEL, "max_tokens": 64, "stream": True,
                         "messages": [{"role": "user", "content": "hello"}]})
    kinds = [line[len("event: "):] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_stop_sequences_and_max_tokens(stack):
    backend, client = stack
    msg = client.messages.create(model=MODEL, max_tokens=64, stop_sequences=["END"],
                                 messages=[{"role": "user", "content": "STOPME"}])
    assert (msg.content[0].text, msg.stop_reason, msg.stop_sequence) == ("one two ", "stop_sequence", "END")
    msg = client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hello"}])
    assert msg.stop_reason == "max_tokens"


def test_tool_use_round_trip(stack):
    backend, client = stack
    messages = [{"role": "user", "content": "Weather in Beijing?"}]
    msg = client.messages.create(model=MODEL, max_tokens=128, tools=[WEATHER], tool_choice={"type": "any"},
                                 messages=messages)
    assert backend.calls[-1].guided.mode == "required"
    assert msg.stop_reason == "tool_use"
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert (use.id, use.name, use.input) == ("functions.get_weather:0", "get_weather", {"city": "Beijing"})
    messages += [{"role": "assistant", "content": msg.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}]
    final = client.messages.create(model=MODEL, max_tokens=128, tools=[WEATHER], messages=messages)
    assert final.content[0].text == "Sunny, 25C." and final.stop_reason == "end_turn"
    assert "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nSunny<|im_end|>" in backend.prompts[-1]
    assert backend.calls[-1].guided.mode == "auto"


def test_streamed_tool_use(stack):
    backend, client = stack
    with client.messages.stream(model=MODEL, max_tokens=128, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        final = stream.get_final_message()
    assert backend.calls[-1].guided.mode == "named"
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Beijing"}


def test_api_key_required_in_anthropic_format(stack):
    backend, client = stack
    bad = anthropic.Anthropic(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"


# ---------------------------------------------------------------- real worker (gRPC + AsyncEngine, tiny checkpoint)

from k2serve.router.pool.worker_client import WorkerClient  # noqa: E402
from router_harness import WorkerThread  # noqa: E402

ENUM_WEATHER = {**WEATHER, "input_schema": {"type": "object", "required": ["city"],
                                            "properties": {"city": {"enum": ["Beijing", "Shanghai"]}}}}


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    with WorkerThread(tiny_model_dir) as worker:
        app = create_app(RouterConfig(), ListPool([WorkerClient(worker.address)]), K2Tokenizer.from_dir(tiny_model_dir),
                         ChatTemplate.from_dir(tiny_model_dir))
        with ServerThread(app) as server:
            yield anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def test_real_message_and_stream(real):
    msg = real.messages.create(model="kimi-k2-tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert msg.stop_reason in ("end_turn", "max_tokens") and 0 < msg.usage.output_tokens <= 8
    with real.messages.stream(model="kimi-k2-tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_real_tool_use_round_trip(real):
    messages = [{"role": "user", "content": "Weather in Beijing?"}]
    msg = real.messages.create(model="kimi-k2-tiny", max_tokens=48, tools=[ENUM_WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"}, messages=messages)
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Beijing", "Shanghai")
    messages += [{"role": "assistant", "content": msg.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}]
    final = real.messages.create(model="kimi-k2-tiny", max_tokens=8, tools=[ENUM_WEATHER], messages=messages)
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
