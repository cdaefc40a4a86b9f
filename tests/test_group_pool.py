"""GroupPool against fake worker groups: retries before the first token, error events after it, 503, 429,
health probing and discovery (add, remove, replace), in-process and through the HTTP APIs."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client import CollectorRegistry

from k2serve.router.app import create_app
from k2serve.router.pool.admission import AdmissionControl
from k2serve.router.pool.balancer import Balancer, BalancerConfig, BreakerState
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.config import RouterConfig
from k2serve.router.pool.discovery import CallableDiscovery, DiscoveryError, GroupInfo, HttpDiscovery, StaticDiscovery, group_info
from k2serve.router.pool.group_pool import GroupPool, GroupPoolConfig
from k2serve.router.metrics import RouterMetrics
from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.router.pool.worker import Finished, GenerateParams, TokenChunk, WorkerError, WorkerLoad, WorkerModelInfo
from router_harness import ServerThread

MODEL = "kimi-k2-tiny"
FAST = GroupPoolConfig(poll_interval_s=0.05, probe_timeout_s=0.2, drain_s=1.0, failed_probes_unhealthy=1)


class FakeGroup:
    """A scripted worker group client: tokens, optional failure before / after the first token, a gate."""

    def __init__(self, address: str, tokens=(300, 301, 302), fail_before: bool = False,
                 fail_after: int | None = None, healthy: bool = True):
        self.address = address
        self.tokens, self.fail_before, self.fail_after, self.healthy = tokens, fail_before, fail_after, healthy
        self.calls: list[str] = []
        self.seen: list[GenerateParams] = []
        self.cached = 0  # the cached_tokens it reports
        self.gate: asyncio.Event | None = None
        self.closed = False
        self.load = WorkerLoad()

    async def generate(self, params: GenerateParams):
        self.calls.append(params.request_id)
        self.seen.append(params)
        n, done = len(params.prompt_token_ids), len(params.output_token_ids)
        if self.fail_before:
            raise WorkerError("worker unavailable: connection reset", 503)
        for i, token in enumerate(self.tokens[done:], start=done + 1):  # a continuation goes on after its tokens
            if self.gate is not None:
                await self.gate.wait()
            yield TokenChunk((token,), (), n, i, self.cached)
            if self.fail_after is not None and i >= self.fail_after:
                raise WorkerError("worker unavailable: group died", 503)
        yield Finished("length", None, n, len(self.tokens), self.cached)

    async def health(self, timeout: float = 2.0) -> bool:
        return self.healthy

    async def get_load(self, timeout: float = 5.0) -> WorkerLoad:
        return self.load

    async def get_model_info(self, timeout: float = 10.0) -> WorkerModelInfo:
        return WorkerModelInfo(MODEL, 4096, 163840, (163585, 163586), "")

    async def close(self) -> None:
        self.closed = True


class Fleet:
    """Discovery and client factory over a mutable set of FakeGroups (by name)."""

    def __init__(self, **groups: FakeGroup):
        self.groups = dict(groups)
        self.generation = {name: 1 for name in groups}
        self.made: list[FakeGroup] = []

    def endpoints(self) -> list[GroupInfo]:
        return [GroupInfo(n, g.address, True, self.generation[n]) for n, g in sorted(self.groups.items())]

    def client(self, address: str) -> FakeGroup:
        group = next(g for g in self.groups.values() if g.address == address)
        self.made.append(group)
        return group


def make_pool(fleet: Fleet, policy: str = "round_robin", admission=None, metrics=None) -> GroupPool:
    return GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy=policy)), admission,
                     metrics, FAST, client_factory=fleet.client)


def params(rid: str = "r", prompt=(1, 2, 3)) -> GenerateParams:
    return GenerateParams(rid, tuple(prompt), max_tokens=8)


async def drain(pool: GroupPool, p: GenerateParams) -> list:
    return [item async for item in pool.generate(p)]


def counter(metrics: RouterMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- request path, in-process


def test_failure_before_first_token_is_retried_on_the_other_group():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", fail_before=True), b=FakeGroup("h:2"))
        metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
        pool = make_pool(fleet, metrics=metrics)
        await pool.refresh()
        items = await drain(pool, params())
        assert isinstance(items[-1], Finished) and [i.token_ids for i in items[:-1]] == [(300,), (301,), (302,)]
        assert fleet.groups["a"].calls == ["r"] and fleet.groups["b"].calls == ["r"]
        assert counter(metrics, "k2serve_router_retries_total", group="a") == 1
        assert pool.balancer.get("a").breaker.consecutive_failures == 1
        assert pool.balancer.get("a").in_flight == pool.balancer.get("b").in_flight == 0
    asyncio.run(main())


def test_failure_after_first_token_is_an_error_when_migration_is_off():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", fail_after=1), b=FakeGroup("h:2"))
        pool = GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(max_migrations=0), client_factory=fleet.client)
        await pool.refresh()
        got = []
        with pytest.raises(WorkerError, match="group died"):
            async for item in pool.generate(params()):
                got.append(item)
        assert len(got) == 1 and fleet.groups["b"].calls == []
        assert pool.balancer.get("a").breaker.consecutive_failures == 1
    asyncio.run(main())


def test_client_errors_are_not_retried_and_attempts_are_bounded():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"), b=FakeGroup("h:2"), c=FakeGroup("h:3"))
        for g in fleet.groups.values():
            g.fail_before = True
        pool = GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(max_attempts=2), client_factory=fleet.client)
        await pool.refresh()
        with pytest.raises(WorkerError):
            await drain(pool, params())
        assert sum(len(g.calls) for g in fleet.groups.values()) == 2
        bad = FakeGroup("h:9")

        async def refuse(p):
            bad.calls.append(p.request_id)
            raise WorkerError("prompt too long", 400)
            yield  # pragma: no cover
        bad.generate = refuse
        pool2 = make_pool(Fleet(x=bad, y=FakeGroup("h:8")))
        await pool2.refresh()
        with pytest.raises(WorkerError, match="too long"):
            await drain(pool2, params())
        assert bad.calls == ["r"] and pool2.balancer.get("x").breaker.consecutive_failures == 0
    asyncio.run(main())


def test_no_healthy_group_is_503_and_recovery_follows_the_probe():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", healthy=False))
        metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
        pool = make_pool(fleet, metrics=metrics)
        await pool.refresh()
        with pytest.raises(Exception) as info:
            await drain(pool, params())
        assert getattr(info.value, "status", None) == 503 and "no healthy worker group" in str(info.value)
        assert counter(metrics, "k2serve_router_group_healthy", group="a") == 0
        fleet.groups["a"].healthy = True
        await pool.refresh()
        assert isinstance((await drain(pool, params()))[-1], Finished)
        assert counter(metrics, "k2serve_router_healthy_groups") == 1
    asyncio.run(main())


def test_admission_queue_full_is_429():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"))
        gate = fleet.groups["a"].gate = asyncio.Event()
        pool = make_pool(fleet, admission=AdmissionControl(max_concurrency=1, max_queue=1))
        await pool.refresh()
        running = asyncio.create_task(drain(pool, params("first")))
        queued = asyncio.create_task(drain(pool, params("second")))
        await asyncio.sleep(0.05)
        with pytest.raises(Exception) as info:
            await drain(pool, params("third"))
        assert getattr(info.value, "status", None) == 429
        gate.set()
        assert all(isinstance(r[-1], Finished) for r in await asyncio.gather(running, queued))
        assert pool.admission.active == 0
    asyncio.run(main())


def test_load_reports_and_breaker_states_reach_the_balancer_and_metrics():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"), b=FakeGroup("h:2"))
        fleet.groups["a"].load = WorkerLoad(num_running=9, num_waiting=3, kv_cache_usage=0.5)
        metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
        pool = make_pool(fleet, policy="least_load", metrics=metrics)
        await pool.refresh()
        assert pool.balancer.get("a").num_running == 9
        assert (await drain(pool, params()))[-1] and fleet.groups["b"].calls == ["r"]
        assert counter(metrics, "k2serve_router_group_dispatches_total", group="b") == 1
        assert counter(metrics, "k2serve_router_circuit_state", group="a") == 0
    asyncio.run(main())


# ---------------------------------------------------------------- discovery


def test_discovery_adds_removes_and_replaces_groups():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"), b=FakeGroup("h:2"))
        pool = make_pool(fleet)
        await pool.refresh()
        assert [g.name for g in pool.groups] == ["a", "b"] and len(pool.workers) == 2
        old_a = fleet.groups["a"]
        for _ in range(3):
            pool.balancer.on_finish(pool.balancer.get("a"), ok=False)  # breaker opens
        assert pool.balancer.get("a").breaker.state is BreakerState.OPEN
        fleet.groups["a"] = FakeGroup("h:7")  # the controller replaced it: new address
        fleet.generation["a"] = 2
        fleet.groups["c"] = FakeGroup("h:3")
        fleet.generation["c"] = 1
        del fleet.groups["b"]
        await pool.refresh()
        await asyncio.sleep(0.05)
        assert [g.name for g in pool.groups] == ["a", "c"]
        assert pool.workers[0] is fleet.groups["a"] and old_a.closed
        assert pool.balancer.get("a").breaker.state is BreakerState.CLOSED  # the new incarnation starts fresh
        assert pool.balancer.get("b") is None and fleet.made[1].closed  # b's client closed
        items = await drain(pool, params())
        assert isinstance(items[-1], Finished)
        same = FakeGroup("h:3")
        fleet.groups["c"] = same  # same address, new generation: still a new client
        fleet.generation["c"] = 2
        await pool.refresh()
        assert pool.workers[1] is same
    asyncio.run(main())


def test_a_failing_discovery_keeps_the_known_groups():
    class Flaky:
        def __init__(self):
            self.fail = False

        async def fetch(self):
            if self.fail:
                raise DiscoveryError("controller unreachable")
            return [GroupInfo("a", "h:1")]

    async def main():
        source = Flaky()
        pool = GroupPool(source, config=FAST, client_factory=lambda address: FakeGroup(address))
        await pool.refresh()
        source.fail = True
        await pool.refresh()
        assert [g.name for g in pool.groups] == ["a"]
    asyncio.run(main())


def test_static_discovery_and_group_info_parsing():
    async def main():
        assert await StaticDiscovery([("a", "h:1")]).fetch() == [GroupInfo("a", "h:1")]
    asyncio.run(main())
    with pytest.raises(ValueError, match="unique"):
        StaticDiscovery([("a", "h:1"), ("a", "h:2")])
    assert group_info({"name": "g", "address": "x:1", "healthy": False, "generation": 3, "pids": [1]}) == \
        GroupInfo("g", "x:1", False, 3)
    with pytest.raises(DiscoveryError, match="address"):
        group_info({"name": "g"})


def test_http_discovery_reads_the_controllers_endpoint():
    from k2serve.cluster.discovery import discovery_app

    class Controller:
        def status(self):
            return [{"name": "g0", "address": "127.0.0.1:5", "healthy": True, "generation": 2}]

    async def fetch(url):
        source = HttpDiscovery(url, timeout_s=2.0)
        try:
            return await source.fetch()
        finally:
            await source.close()

    with ServerThread(discovery_app(Controller())) as server:
        assert asyncio.run(fetch(server.url)) == [GroupInfo("g0", "127.0.0.1:5", True, 2)]
        with pytest.raises(DiscoveryError, match="404"):
            asyncio.run(fetch(server.url + "/nowhere"))
    with pytest.raises(DiscoveryError, match="cannot read"):
        asyncio.run(fetch(server.url))


# ---------------------------------------------------------------- through the HTTP APIs


@pytest.fixture(scope="module")
def tokenizer_and_template(tiny_model_dir):
    return K2Tokenizer.from_dir(tiny_model_dir), ChatTemplate.from_dir(tiny_model_dir)


async def api_call(pool: GroupPool, tt, path: str, body: dict) -> httpx.Response:
    tokenizer, template = tt
    app = create_app(RouterConfig(model_name=MODEL), pool, tokenizer, template)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        return await client.post(path, json=body)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
MESSAGES = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def sse_payloads(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


def test_api_failure_after_first_token_ends_the_stream_with_an_error_event(tokenizer_and_template):
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", fail_after=1), b=FakeGroup("h:2", fail_after=1))
        pool = GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(max_migrations=0), client_factory=fleet.client)
        await pool.refresh()
        chat = await api_call(pool, tokenizer_and_template, "/v1/chat/completions", {**CHAT, "stream": True})
        anth = await api_call(pool, tokenizer_and_template, "/v1/messages", {**MESSAGES, "stream": True})
        return chat, anth, fleet
    chat, anth, fleet = asyncio.run(main())
    assert chat.status_code == 200
    payloads = sse_payloads(chat.text)
    assert payloads[-1]["error"]["message"].endswith("group died") and payloads[-1]["error"]["type"]
    assert any(p.get("choices") and p["choices"][0]["delta"].get("content") for p in payloads[:-1])
    assert anth.status_code == 200 and "event: error" in anth.text and "group died" in anth.text
    assert "message_stop" not in anth.text
    assert [len(g.calls) for g in fleet.groups.values()] == [1, 1]  # one group each, no retry


def test_api_retry_before_first_token_is_invisible_to_the_client(tokenizer_and_template):
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", fail_before=True), b=FakeGroup("h:2"))
        pool = make_pool(fleet)
        await pool.refresh()
        return await api_call(pool, tokenizer_and_template, "/v1/chat/completions", {**CHAT, "stream": True})
    resp = asyncio.run(main())
    assert resp.status_code == 200 and '"finish_reason":"length"' in resp.text and "error" not in resp.text


def test_api_503_and_429_in_each_apis_format(tokenizer_and_template):
    async def main():
        down = make_pool(Fleet(a=FakeGroup("h:1", healthy=False)))
        await down.refresh()
        # model info is known (the worker answers GetModelInfo) but no group passes its health check
        chat = await api_call(down, tokenizer_and_template, "/v1/chat/completions", CHAT)
        anth = await api_call(down, tokenizer_and_template, "/v1/messages", {**MESSAGES, "stream": True})
        fleet = Fleet(a=FakeGroup("h:1"))
        gate = fleet.groups["a"].gate = asyncio.Event()
        busy = make_pool(fleet, admission=AdmissionControl(max_concurrency=1, max_queue=0))
        await busy.refresh()
        held = asyncio.create_task(drain(busy, params()))
        await asyncio.sleep(0.02)
        over = await api_call(busy, tokenizer_and_template, "/v1/chat/completions", CHAT)
        over_anth = await api_call(busy, tokenizer_and_template, "/v1/messages", MESSAGES)
        gate.set()
        await held
        after = await api_call(busy, tokenizer_and_template, "/v1/chat/completions", CHAT)
        return chat, anth, over, over_anth, after
    chat, anth, over, over_anth, after = asyncio.run(main())
    assert chat.status_code == 503 and chat.json()["error"]["type"] == "service_unavailable_error"
    assert anth.status_code == 503 and anth.json()["type"] == "error"
    assert over.status_code == 429 and over.json()["error"]["code"] == "overloaded"
    assert over_anth.status_code == 429 and over_anth.json()["error"]["type"] == "rate_limit_error"
    assert after.status_code == 200


def test_background_polling_marks_a_dead_group_unhealthy():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"), b=FakeGroup("h:2"))
        pool = GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(poll_interval_s=0.05, probe_timeout_s=0.2, failed_probes_unhealthy=2),
                         client_factory=fleet.client)
        await pool.refresh()
        fleet.groups["a"].healthy = False
        await pool.refresh()
        assert pool.balancer.get("a").healthy  # one failed probe is not enough
        fleet.groups["a"].healthy = True
        await pool.refresh()
        fleet.groups["a"].healthy = False
        await pool.refresh()
        assert pool.balancer.get("a").healthy  # the count restarts after a good probe
        pool.start()
        try:
            await asyncio.sleep(0.3)
            assert not pool.balancer.get("a").healthy
            for i in range(4):
                await drain(pool, params(f"r{i}"))
            assert fleet.groups["a"].calls == [] and len(fleet.groups["b"].calls) == 4
        finally:
            await pool.close()
        assert all(g.closed for g in fleet.groups.values())
    asyncio.run(main())


def test_vllm_extra_body_fields_reach_the_worker(tokenizer_and_template):
    """The openai SDK's extra_body: ignore_eos, min_tokens, top_k, repetition_penalty -> GenerateParams."""
    import openai

    tokenizer, template = tokenizer_and_template
    seen: list[GenerateParams] = []

    class Recording(FakeGroup):
        async def generate(self, params):
            seen.append(params)
            async for item in super().generate(params):
                yield item

    async def main():
        pool = make_pool(Fleet(a=Recording("h:1")))
        await pool.refresh()
        app = create_app(RouterConfig(model_name=MODEL), pool, tokenizer, template)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router/v1")
        client = openai.AsyncOpenAI(api_key="x", base_url="http://router/v1", http_client=http)
        extra = {"ignore_eos": True, "min_tokens": 3, "top_k": 5, "repetition_penalty": 1.1}
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, extra_body=extra)
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body=extra)
        await http.aclose()
    asyncio.run(main())
    assert len(seen) == 2
    for p in seen:
        assert (p.ignore_eos, p.min_tokens, p.top_k, p.repetition_penalty) == (True, 3, 5, 1.1)


def test_config_and_status_commands(tmp_path, capsys):
    from k2serve.cluster.cli import main
    from k2serve.cluster.discovery import discovery_app

    assert main(["config", "--print-defaults"]) == 0
    out = capsys.readouterr().out
    assert "max_concurrency:" in out and "policy: cache_aware" in out and "discovery_port: 8001" in out
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("groups: [{name: a, tp: 1, ep: 1}]\n")
    bad.write_text("router: {policy: fastest}\n")
    assert main(["config", "--check", str(good)]) == 0 and main(["config", "--check", str(bad)]) == 1
    assert "fastest" in capsys.readouterr().err

    class Controller:
        def status(self):
            return [{"name": "g0", "address": "127.0.0.1:1", "healthy": True, "generation": 1}]

    with ServerThread(discovery_app(Controller())) as server:
        assert main(["status", "--discovery", server.url, "--timeout", "0.5"]) == 2  # no group serves
    out = capsys.readouterr().out
    assert out.split()[:3] == ["group", "address", "gen"] and "g0" in out and "down" in out


def test_streamed_choices_never_deadlock_on_admission_slots(tokenizer_and_template):
    """A primed choice holds its slot until the response consumes it: priming all n choices in turn
    deadlocked once the slots ran out (one request with n=2 and one slot; or four with n=2 and four)."""
    async def main():
        fleet = Fleet(a=FakeGroup("h:1"))
        one_slot = make_pool(fleet, admission=AdmissionControl(max_concurrency=1, max_queue=8))
        await one_slot.refresh()
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 2, "stream": True}
        alone = await asyncio.wait_for(api_call(one_slot, tokenizer_and_template, "/v1/completions", body), 10)
        four = make_pool(fleet, admission=AdmissionControl(max_concurrency=4, max_queue=64))
        await four.refresh()
        together = await asyncio.wait_for(asyncio.gather(
            *(api_call(four, tokenizer_and_template, "/v1/completions", body) for _ in range(4))), 10)
        return [alone, *together], one_slot, four

    responses, one_slot, four = asyncio.run(main())
    for r in responses:
        assert r.status_code == 200
        finished = {p["choices"][0]["index"] for p in sse_payloads(r.text) if p["choices"][0]["finish_reason"]}
        assert finished == {0, 1}, r.text
    assert one_slot.admission.active == 0 and four.admission.active == 0
