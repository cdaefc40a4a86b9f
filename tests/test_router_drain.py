"""The router's drain (SIGTERM): /ready 503, new requests 503, requests in flight finish, exit 0.

At the ASGI level against a fake pool, then `k2serve router` as a real process in front of a real worker
(the tiny checkpoint's engine behind gRPC, in this process), signalled while it streams."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from k2serve.router.app import create_app
from k2serve.router.config import RouterConfig
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.text.tokenizer import K2Tokenizer

from router_harness import ListPool, ScriptedBackend, WorkerThread, free_port
from test_serve import K2Process

MODEL = "kimi-k2-tiny"


def test_a_draining_app_refuses_new_api_requests_and_is_not_ready(tiny_model_dir):
    tokenizer = K2Tokenizer.from_dir(tiny_model_dir)
    backend = ScriptedBackend(tokenizer, lambda params, prompt: "hello there")
    app = create_app(RouterConfig(model_name=MODEL), ListPool([backend]), tokenizer,
                     ChatTemplate.from_dir(tiny_model_dir))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            before = (await client.get("/ready")).status_code, (await client.post("/v1/chat/completions", json=chat))
            app.state.ctx.drain.begin()
            ready = await client.get("/ready")
            refused = await client.post("/v1/chat/completions", json=chat)
            anthropic = await client.post("/v1/messages", json={**chat, "max_tokens": 4})
            health = await client.get("/health")
        return before, ready, refused, anthropic, health
    (ready_before, served), ready, refused, anthropic, health = asyncio.run(main())
    assert ready_before == 200 and served.status_code == 200
    assert ready.status_code == 503 and ready.json() == {"ready": False, "draining": True}
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert refused.headers["connection"] == "close" and len(backend.calls) == 1
    assert anthropic.status_code == 503 and anthropic.json()["type"] == "error"
    assert health.status_code == 200 and health.headers["connection"] == "close"
    assert app.state.ctx.drain.in_flight == 0


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    with WorkerThread(tiny_model_dir) as w:
        yield w


def stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        out.append(resp.status_code)
        for line in resp.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()


def test_sigterm_drains_the_router_process_and_exits_0(tmp_path, tiny_model_dir, worker):
    port = free_port()
    (tmp_path / "router.yaml").write_text(
        f'model: {{path: "{tiny_model_dir}", name: {MODEL}}}\ncontroller: {{drain_timeout_s: 30}}\n')
    proc = K2Process(["router", "--config", str(tmp_path / "router.yaml"), "--group", f"g0={worker.address}",
                      "--port", str(port)], tmp_path / "router.log", tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/ready", timeout=60)
        body = {"model": MODEL, "prompt": "drain me", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}
        lines: list = []
        started = threading.Event()
        client = threading.Thread(target=stream_lines, args=(url, body, lines, started))
        client.start()
        assert started.wait(30)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(url + "/ready", timeout=5)
        refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=5)
        client.join(60)
        code = proc.proc.wait(60)
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert ready.status_code == 503 and refused.status_code == 503, proc.log()[-2000:]
    assert lines[0] == 200 and lines[-1] == "[DONE]", lines[-3:]
    finals = [json.loads(x)["choices"][0]["finish_reason"] for x in lines[1:-1] if json.loads(x).get("choices")]
    assert finals[-1] == "length" and not any("error" in x for x in lines[1:-1])
    assert code == 0, proc.log()[-2000:]


def test_the_router_socket_bounds_the_send_buffer_of_each_connection():
    """A client that stops reading fills the kernel's send buffer before the router's writes block; with
    autotuning that is megabytes per connection, so the router's socket fixes it (send_buffer_bytes)."""
    import socket

    from k2serve.cluster.listener import bind

    listener = bind("127.0.0.1", 0, "router", 65536)
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()) as client:
        conn, _ = listener.accept()
        with conn:
            assert 65536 <= conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * 65536  # Linux doubles it
    assert RouterConfig().send_buffer_bytes == 131072 and RouterConfig(send_buffer_bytes=None).send_buffer_bytes is None
