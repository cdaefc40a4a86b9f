"""Bad input gets the documented status in each API's own error format, and the router keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from k2serve.router.app import create_app
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.config import RouterConfig
from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.router.pool.worker import WorkerError
from router_harness import ListPool, ScriptedBackend, ServerThread

MODEL = "kimi-k2-tiny"
KEY = "sk-secret"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def script(params, prompt: str):
    if "OVERLOAD" in prompt:
        return WorkerError("waiting queue is full", 429)
    if "CRASH" in prompt:
        return WorkerError("engine failed", 500)
    if "BUG" in prompt:
        raise RuntimeError("a bug in the worker client")
    return "ok"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    path = tiny_model_dir
    tokenizer = K2Tokenizer.from_dir(path)
    backend = ScriptedBackend(tokenizer, script, context_length=256)
    config = RouterConfig(model_name=MODEL, api_key=KEY, max_body_bytes=20_000)
    with ServerThread(create_app(config, ListPool([backend]), tokenizer, ChatTemplate.from_dir(path))) as srv:
        yield srv


def post(server, path, body=None, content=None, key=KEY, headers=None):
    h = {"authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.post(server.url + path, json=body, content=content, headers=h, timeout=10)


def openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    return err


def anthropic_error(r, status, kind):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]


DEEP = {"type": "object", "properties": {}}
for _ in range(150):
    DEEP = {"type": "object", "properties": {"a": DEEP}}

CHAT_CASES = [
    ("invalid json", None, b"{not json", 400),
    ("body nested too deeply", None, b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("schema nested too deeply", {"model": MODEL, "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": DEEP}}}, None, 400),
    ("seed past int64", {"model": MODEL, "messages": MSGS, "seed": 2 ** 63}, None, 400),
    ("top_k past int32", {"model": MODEL, "messages": MSGS, "top_k": 2 ** 31}, None, 400),
    ("min_tokens past int32", {"model": MODEL, "messages": MSGS, "min_tokens": 2 ** 31}, None, 400),
    ("tool call without a name", {"model": MODEL, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "", "arguments": "{}"}}]}]}, None, 400),
    ("not an object", [1, 2], None, 400),
    ("wrong type", {"model": MODEL, "messages": "hi"}, None, 400),
    ("missing messages", {"model": MODEL}, None, 400),
    ("empty messages", {"model": MODEL, "messages": []}, None, 400),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400),
    ("unknown model", {"model": "gpt-4", "messages": MSGS}, None, 404),
    ("max_tokens 0", {"model": MODEL, "messages": MSGS, "max_tokens": 0}, None, 400),
    ("max_tokens negative", {"model": MODEL, "messages": MSGS, "max_completion_tokens": -5}, None, 400),
    ("over context", {"model": MODEL, "messages": MSGS, "max_tokens": 250}, None, 400),
    ("temperature", {"model": MODEL, "messages": MSGS, "temperature": 9}, None, 400),
    ("unsupported parameter", {"model": MODEL, "messages": MSGS, "functions": []}, None, 400),
    ("image part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None, 400),
    ("malformed tool schema", {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 12}}}]}, None, 400),
    ("bad tool name", {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {
        "name": "no spaces allowed"}}]}, None, 400),
    ("named tool not declared", {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {
        "name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, 400),
    ("tool_choice without tools", {"model": MODEL, "messages": MSGS, "tool_choice": "required"}, None, 400),
    ("bad json_schema", {"model": MODEL, "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, None, 400),
    ("n too large", {"model": MODEL, "messages": MSGS, "n": 1000}, None, 400),
    ("top_logprobs without logprobs", {"model": MODEL, "messages": MSGS, "top_logprobs": 2}, None, 400),
    ("tool message without id", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, None, 400),
    ("worker overloaded", {"model": MODEL, "messages": [{"role": "user", "content": "OVERLOAD"}]}, None, 429),
    ("worker overloaded stream", {"model": MODEL, "stream": True,
                                  "messages": [{"role": "user", "content": "OVERLOAD"}]}, None, 429),
    ("worker failure", {"model": MODEL, "messages": [{"role": "user", "content": "CRASH"}]}, None, 500),
]


@pytest.mark.parametrize("name,body,content,status", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bad_input(server, name, body, content, status):
    openai_error(post(server, CHAT, body, content), status)
    assert post(server, CHAT, {"model": MODEL, "messages": MSGS}).status_code == 200  # still serving


def test_completions_bad_input(server):
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": ""}), 400)
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [10**9]}), 400)
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}), 400)
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}), 400)


def test_body_size_limit(server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 30_000}]}
    openai_error(post(server, CHAT, big), 413)
    anthropic_error(post(server, "/v1/messages", {**big, "max_tokens": 5}), 413, "request_too_large")


def test_api_key(server):
    err = openai_error(post(server, CHAT, {"model": MODEL, "messages": MSGS}, key="wrong"), 401)
    assert err["code"] == "invalid_api_key"
    openai_error(post(server, CHAT, {"model": MODEL, "messages": MSGS}, key=None), 401)
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    anthropic_error(post(server, "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MSGS}, key=None),
                    401, "authentication_error")
    ok = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MSGS}, key=None,
              headers={"x-api-key": KEY})
    assert ok.status_code == 200


ANTHROPIC_CASES = [
    ("missing max_tokens", {"model": MODEL, "messages": MSGS}, 400, "invalid_request_error"),
    ("top_k past int32", {"model": MODEL, "max_tokens": 5, "messages": MSGS, "top_k": 2 ** 31}, 400,
     "invalid_request_error"),
    ("tool use without a name", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "", "input": {}}]}]}, 400, "invalid_request_error"),
    ("max_tokens 0", {"model": MODEL, "max_tokens": 0, "messages": MSGS}, 400, "invalid_request_error"),
    ("unknown model", {"model": "claude-x", "max_tokens": 5, "messages": MSGS}, 404, "not_found_error"),
    ("bad block", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "video"}]}]}, 400, "invalid_request_error"),
    ("bad tool schema", {"model": MODEL, "max_tokens": 5, "messages": MSGS, "tools": [
        {"name": "f", "input_schema": {"type": 3}}]}, 400, "invalid_request_error"),
    ("over context", {"model": MODEL, "max_tokens": 10_000, "messages": MSGS}, 400, "invalid_request_error"),
    ("overloaded", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "OVERLOAD"}]},
     429, "rate_limit_error"),
]


@pytest.mark.parametrize("name,body,status,kind", ANTHROPIC_CASES, ids=[c[0] for c in ANTHROPIC_CASES])
def test_anthropic_bad_input(server, name, body, status, kind):
    anthropic_error(post(server, "/v1/messages", body), status, kind)


def test_unknown_path_is_404_in_format(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"authorization": f"Bearer {KEY}"})
    openai_error(r, 404)


def test_wrong_method_on_an_api_path_is_405_in_format(server):
    r = httpx.get(server.url + CHAT, headers={"authorization": f"Bearer {KEY}"})
    openai_error(r, 405)


@pytest.mark.parametrize("path,body", [
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "BUG"}]}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "BUG"}]})])
def test_unexpected_error_is_500_in_format(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "internal server error"
    assert post(server, CHAT, {"model": MODEL, "messages": MSGS}).status_code == 200


def test_the_largest_seed_with_n_choices_wraps_within_int64():
    from k2serve.router.api.request_params import sampling_params
    from k2serve.router.pool.worker_client import request_to_proto

    ctx = type("Ctx", (), {"config": RouterConfig(model_name=MODEL)})()
    req = type("Req", (), {"seed": 2 ** 63 - 1, "top_p": None})()
    seeds = [sampling_params(ctx, req, "r", [1, 2], 4, i).seed for i in range(3)]
    assert seeds == [2 ** 63 - 1, -2 ** 63, -2 ** 63 + 1]
    for i in range(3):
        request_to_proto(sampling_params(ctx, req, "r", [1, 2], 4, i))  # every seed fits the proto's int64


# ---------------------------------------------------------------- OpenAPI


def test_openapi_json_and_docs_describe_the_real_request_models(tiny_model_dir):
    import jsonschema

    tokenizer = K2Tokenizer.from_dir(tiny_model_dir)
    app = create_app(RouterConfig(model_name="m"), ListPool([]), tokenizer, ChatTemplate.from_dir(tiny_model_dir))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            return (await client.get("/openapi.json")), (await client.get("/docs"))
    doc, docs = asyncio.run(main())
    assert doc.status_code == 200 and docs.status_code == 200 and "/openapi.json" in docs.text
    spec = doc.json()
    assert spec["openapi"].startswith("3.1") and spec["info"]["title"] == "k2serve router"
    assert set(spec["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                                  "/health", "/ready"}  # no /metrics: this app has none
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/v1/messages", "MessagesRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    chat = {**schemas["ChatCompletionRequest"], "components": {"schemas": schemas}}
    validator = jsonschema.Draft202012Validator(chat)
    assert validator.is_valid({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert not validator.is_valid({"model": "m", "messages": [{"role": "nobody", "content": "hi"}]})
    assert not validator.is_valid({"model": "m", "messages": [], "no_such_field": 1})  # extra fields: 400 too
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
