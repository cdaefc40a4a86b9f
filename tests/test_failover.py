"""Two worker groups (TP=EP=1) behind routers, all real processes: `k2serve serve` (controller, groups, a
cache_aware router) plus two `k2serve router` processes polling its discovery endpoint (least_load; and
least_load with tiny admission limits). Prefix affinity, load spreading, overload 429s, and failover:
a killed group's streaming requests migrate to the other group and finish there, new requests go to the
other group, the controller replaces the group and the routers use it again. No request may hang or fail
(tests/test_faults.py covers more faults)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import openai
import pytest

from test_serve import K2Process, free_port

MODEL = "kimi-k2-tiny"
REQUEST_TIMEOUT = 90.0


def cluster_yaml(model_dir, discovery_port: int, router: str) -> str:
    return f"""
model: {{path: "{model_dir}", name: {MODEL}}}
groups:
  - {{name: g0, tp: 1, ep: 1, collective_timeout_s: 10}}
  - {{name: g1, tp: 1, ep: 1, collective_timeout_s: 10}}
engine: {{max_num_seqs: 8, num_kv_blocks: 192, block_size: 16, max_num_batched_tokens: 256}}
router: {router}
controller: {{health_interval_s: 0.5, discovery_port: {discovery_port}, drain_timeout_s: 2}}
ray: {{num_cpus: 4}}
"""


class Stack:
    """The serve process and the two router processes, with their URLs."""

    def __init__(self, tmp, model_dir):
        self.discovery = f"http://127.0.0.1:{free_port()}"
        dport = int(self.discovery.rsplit(":", 1)[1])
        routers = {"affine": "{policy: cache_aware, prefix_block_tokens: 16}",
                   "spread": "{policy: least_load}",
                   "small": "{policy: least_load, max_concurrency: 2, max_queue: 1}"}
        self.urls, self.procs = {}, {}
        for name, router in routers.items():
            (tmp / f"{name}.yaml").write_text(cluster_yaml(model_dir, dport, router))
            self.urls[name] = f"http://127.0.0.1:{free_port()}"
        self.procs["affine"] = K2Process(["serve", "--config", str(tmp / "affine.yaml"), "--port",
                                          self.urls["affine"].rsplit(":", 1)[1]], tmp / "serve.log", tmp)
        for name in ("spread", "small"):
            self.procs[name] = K2Process(["router", "--config", str(tmp / f"{name}.yaml"), "--discovery",
                                          self.discovery, "--port", self.urls[name].rsplit(":", 1)[1]],
                                         tmp / f"{name}.log", tmp)

    def wait_ready(self) -> None:
        for name, proc in self.procs.items():
            proc.wait_ready(self.urls[name] + "/ready")

    def groups(self) -> dict[str, dict]:
        return {g["name"]: g for g in httpx.get(self.discovery + "/v1/groups", timeout=5).json()["groups"]}

    def dispatches(self, router: str) -> dict[str, float]:
        text = httpx.get(self.urls[router] + "/metrics", timeout=5).text
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'^k2serve_router_group_dispatches_total\{group="([^"]+)"\} (\S+)$', text, re.M)}

    def migrations(self, router: str) -> float:
        text = httpx.get(self.urls[router] + "/metrics", timeout=5).text
        return sum(float(m.group(1)) for m in
                   re.finditer(r'^k2serve_router_migrations_total\{group="[^"]+"\} (\S+)$', text, re.M))

    def stop(self) -> None:
        for name in ("spread", "small", "affine"):
            proc = self.procs[name]
            if proc.proc.poll() is None:
                try:
                    proc.interrupt(signal.SIGTERM, timeout=60)
                except Exception:  # noqa: BLE001 - teardown must not leave processes behind
                    proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    s = Stack(tmp_path_factory.mktemp("failover"), tiny_model_dir)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {g: after.get(g, 0.0) - before.get(g, 0.0) for g in ("g0", "g1")}


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming /v1/completions request: HTTP status, tokens seen, finish reason, error event."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True}
    out = {"status": None, "chunks": 0, "finish": None, "error": None}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        out["status"] = resp.status_code
        if resp.status_code != 200:
            out["error"] = (await resp.aread()).decode()
            return out
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                out["error"] = payload["error"]
            elif payload["choices"]:
                choice = payload["choices"][0]
                out["chunks"] += bool(choice["text"])
                out["finish"] = choice["finish_reason"] or out["finish"]
    return out


async def burst(url: str, prompts: list[str], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        return await asyncio.wait_for(asyncio.gather(*(stream_completion(client, url, p, max_tokens)
                                                       for p in prompts)), REQUEST_TIMEOUT)


def test_cache_aware_sends_a_repeated_prefix_to_one_group(stack):
    client = openai.OpenAI(api_key="none", base_url=stack.urls["affine"] + "/v1", timeout=REQUEST_TIMEOUT)
    system = "You answer questions about the weather in the cities of the world. " * 4
    before = stack.dispatches("affine")
    cached = []
    for question in ("Beijing?", "Paris?", "Lima?", "Oslo?"):
        resp = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
    moved = delta(stack.dispatches("affine"), before)
    assert sorted(moved.values()) == [0.0, 4.0], moved
    assert all(c >= 16 for c in cached[1:]), cached  # the group's prefix cache served the shared system prompt


def test_least_load_spreads_a_burst_over_both_groups(stack):
    before = stack.dispatches("spread")
    results = asyncio.run(burst(stack.urls["spread"], [f"burst request number {i}" for i in range(8)], 16))
    assert all(r["status"] == 200 and r["finish"] == "length" for r in results), results
    moved = delta(stack.dispatches("spread"), before)
    assert moved["g0"] >= 2 and moved["g1"] >= 2, moved


def test_overload_answers_429_and_then_serves_normally(stack):
    results = asyncio.run(burst(stack.urls["small"], [f"overload {i}" for i in range(8)], 24))
    statuses = sorted(r["status"] for r in results)
    assert statuses.count(429) >= 3 and statuses.count(200) >= 3, statuses  # 2 running + 1 queued fit
    assert all(r["finish"] == "length" for r in results if r["status"] == 200), results
    assert all("overloaded" in r["error"] for r in results if r["status"] == 429)
    after = asyncio.run(burst(stack.urls["small"], ["after the storm", "calm again"], 8))
    assert [r["status"] for r in after] == [200, 200] and all(r["finish"] == "length" for r in after)


def test_killed_group_fails_over_and_is_replaced(stack):
    groups = stack.groups()
    victim = groups["g0"]
    assert victim["generation"] == 1 and len(victim["pids"]) == 1

    async def scenario():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            url = stack.urls["spread"]
            first = [asyncio.create_task(stream_completion(client, url, f"long stream {i}", 160)) for i in range(6)]
            await asyncio.sleep(1.5)  # they are streaming now, on both groups
            os.kill(victim["pids"][0], signal.SIGKILL)
            second = [asyncio.create_task(stream_completion(client, url, f"after the kill {i}", 8)) for i in range(4)]
            done = await asyncio.wait_for(asyncio.gather(*first, *second), REQUEST_TIMEOUT)
            return done[:6], done[6:]

    migrated_before = stack.migrations("spread")
    first, second = asyncio.run(scenario())
    assert all(r["status"] == 200 for r in first + second), first + second  # no pre-token failure reached a client
    # the streams of the killed group went on on the other group: none broke
    assert all(r["error"] is None and r["finish"] == "length" for r in first + second), first + second
    assert stack.migrations("spread") > migrated_before

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        g0 = stack.groups().get("g0")
        if g0 and g0["generation"] == 2 and g0["healthy"]:
            break
        time.sleep(1)
    else:
        pytest.fail(f"g0 was not replaced: {stack.groups()}")
    assert g0["address"] and g0["pids"] != victim["pids"]

    before = stack.dispatches("spread")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and delta(stack.dispatches("spread"), before)["g0"] < 1:
        results = asyncio.run(burst(stack.urls["spread"], ["welcome back", "second"], 4))
        assert all(r["status"] == 200 and r["finish"] == "length" for r in results), results
    assert delta(stack.dispatches("spread"), before)["g0"] >= 1
