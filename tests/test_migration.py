"""Mid-stream migration, hung groups, deadlines and slow consumers in the GroupPool and its gRPC client.

First against scripted fake groups (test_group_pool's FakeGroup, which continues a continuation after its
output_token_ids), then over real gRPC: two worker servers with a fake engine (token i at step i), one of
them stopped mid-stream (its connection resets), a deadline, and a consumer that stops reading."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from k2serve.router.app import create_app
from k2serve.router.config import RouterConfig
from k2serve.router.errors import APIError
from k2serve.router.metrics import RouterMetrics
from k2serve.router.pool.admission import AdmissionControl
from k2serve.router.pool.balancer import Balancer, BalancerConfig
from k2serve.router.pool.discovery import CallableDiscovery, StaticDiscovery
from k2serve.router.pool.group_pool import GroupPool, GroupPoolConfig
from k2serve.router.pool.worker import Finished, GenerateParams, TokenChunk, WorkerError
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.worker.server import serve_worker

from test_group_pool import (MODEL, FakeGroup, Fleet, api_call, counter, sse_payloads,  # noqa: F401
                             tokenizer_and_template)
from test_server import INFO, FakeEngine

TOKENS = tuple(range(300, 306))


def pool_over(fleet: Fleet, metrics=None, admission=None, **config) -> GroupPool:
    config = GroupPoolConfig(**{"poll_interval_s": 0.05, "probe_timeout_s": 0.2, "failed_probes_unhealthy": 1,
                                "drain_s": 1.0, **config})
    return GroupPool(CallableDiscovery(fleet.endpoints), Balancer(BalancerConfig(policy="round_robin")),
                     admission, metrics, config, client_factory=fleet.client)


async def collect(pool: GroupPool, params: GenerateParams) -> list:
    return [item async for item in pool.generate(params)]


def tokens_of(items) -> list[int]:
    return [t for i in items if isinstance(i, TokenChunk) for t in i.token_ids]


def request(rid: str = "r", deadline: float | None = None) -> GenerateParams:
    return GenerateParams(rid, (1, 2, 3), temperature=0.0, seed=5, max_tokens=len(TOKENS), deadline=deadline)


class HangingGroup(FakeGroup):
    """Streams its first token, then hangs (a stopped rank); `close` fails what is in flight, as a
    WorkerClient's does."""

    def __init__(self, address: str):
        super().__init__(address, TOKENS)
        self._closed = asyncio.Event()

    async def generate(self, params):
        self.calls.append(params.request_id)
        yield TokenChunk((TOKENS[0],), (), len(params.prompt_token_ids), 1, 0)
        await self._closed.wait()
        raise WorkerError("the router closed the session", 503)

    async def close(self) -> None:
        self.closed = True
        self._closed.set()


# ---------------------------------------------------------------- fake groups


def test_a_group_failing_mid_stream_is_migrated_and_the_stream_goes_on():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", TOKENS, fail_after=2), b=FakeGroup("h:2", TOKENS))
        fleet.groups["a"].cached, fleet.groups["b"].cached = 2, 3
        metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
        pool = pool_over(fleet, metrics)
        await pool.refresh()
        items = await collect(pool, request())
        return fleet, metrics, pool, items
    fleet, metrics, pool, items = asyncio.run(main())
    assert tokens_of(items) == list(TOKENS)  # none lost, none repeated
    moved = fleet.groups["b"].seen[0]
    assert moved.output_token_ids == TOKENS[:2] and moved.prompt_token_ids == (1, 2, 3)
    assert (moved.seed, moved.temperature, moved.max_tokens) == (5, 0.0, len(TOKENS))  # the same settings
    assert [(i.prompt_tokens, i.completion_tokens) for i in items if isinstance(i, TokenChunk)] == \
        [(3, k) for k in range(1, 7)]
    assert items[-1] == Finished("length", None, 3, 6, 2)  # cached: what the first group served
    assert all(i.cached_tokens == 2 for i in items)
    assert counter(metrics, "k2serve_router_migrations_total", group="a") == 1
    assert counter(metrics, "k2serve_router_retries_total", group="a") == 0
    assert pool.balancer.get("a").in_flight == pool.balancer.get("b").in_flight == 0


def test_migrations_are_bounded_and_no_group_left_is_a_clear_503():
    async def main():
        limited = Fleet(a=FakeGroup("h:1", TOKENS, fail_after=1), b=FakeGroup("h:2", TOKENS, fail_after=2),
                        c=FakeGroup("h:3", TOKENS))
        pool = pool_over(limited, max_migrations=1)
        await pool.refresh()
        got = []
        with pytest.raises(WorkerError, match="group died"):
            async for item in pool.generate(request()):
                got.append(item)
        assert tokens_of(got) == list(TOKENS[:2]) and limited.groups["c"].calls == []
        exhausted = Fleet(a=FakeGroup("h:1", TOKENS, fail_after=1), b=FakeGroup("h:2", TOKENS, fail_after=3))
        pool = pool_over(exhausted)
        await pool.refresh()
        got = []
        with pytest.raises(APIError) as err:
            async for item in pool.generate(request()):
                got.append(item)
        return got, err.value
    got, err = asyncio.run(main())
    assert tokens_of(got) == list(TOKENS[:3])
    assert err.status == 503 and "worker group(s) a, b after 3 tokens" in err.message


def test_a_replaced_group_may_take_back_a_request_that_failed_on_it():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", TOKENS, fail_after=1), b=FakeGroup("h:2", TOKENS, fail_after=3))
        pool = pool_over(fleet)
        await pool.refresh()
        stream = pool.generate(request())
        got = [await stream.__anext__(), await stream.__anext__()]  # a failed; b streams
        fleet.groups["a"] = FakeGroup("h:9", TOKENS)  # the controller replaced a
        fleet.generation["a"] = 2
        await pool.refresh()
        got += [item async for item in stream]
        return fleet, got
    fleet, got = asyncio.run(main())
    assert tokens_of(got) == list(TOKENS)
    assert fleet.groups["a"].seen[0].output_token_ids == TOKENS[:3]


def test_a_hung_group_is_found_by_its_probe_and_its_requests_migrate():
    async def main():
        fleet = Fleet(a=HangingGroup("h:1"), b=FakeGroup("h:2", TOKENS))
        metrics = RouterMetrics(CollectorRegistry(), model=MODEL)
        pool = pool_over(fleet, metrics, stall_timeout_s=0.2).start()
        try:
            await pool.wait_discovered()
            task = asyncio.create_task(collect(pool, request()))
            await asyncio.sleep(0.1)
            assert not task.done() and fleet.groups["a"].calls == ["r"]
            fleet.groups["a"].healthy = False  # its step loop heartbeat failed: NOT_SERVING
            items = await asyncio.wait_for(task, 5)
        finally:
            await pool.close()
        return fleet, metrics, items
    fleet, metrics, items = asyncio.run(main())
    assert tokens_of(items) == list(TOKENS) and isinstance(items[-1], Finished)
    assert fleet.groups["b"].seen[0].output_token_ids == TOKENS[:1]
    assert counter(metrics, "k2serve_router_migrations_total", group="a") == 1


def test_a_draining_group_that_keeps_streaming_keeps_its_requests():
    class Slow(FakeGroup):
        async def generate(self, params):
            async for item in super().generate(params):
                await asyncio.sleep(0.05)
                yield item

    async def main():
        fleet = Fleet(a=Slow("h:1", TOKENS), b=FakeGroup("h:2", TOKENS))
        pool = pool_over(fleet, stall_timeout_s=0.5).start()
        try:
            await pool.wait_discovered()
            task = asyncio.create_task(collect(pool, request()))
            await asyncio.sleep(0.05)
            fleet.groups["a"].healthy = False  # draining: NOT_SERVING, but its requests go on
            items = await asyncio.wait_for(task, 5)
        finally:
            await pool.close()
        return fleet, items
    fleet, items = asyncio.run(main())
    assert tokens_of(items) == list(TOKENS) and fleet.groups["b"].calls == []


def test_a_deadline_ends_the_wait_for_a_slot_and_stops_migration():
    async def main():
        fleet = Fleet(a=FakeGroup("h:1", TOKENS))
        gate = fleet.groups["a"].gate = asyncio.Event()
        pool = pool_over(fleet, admission=AdmissionControl(max_concurrency=1, max_queue=4))
        await pool.refresh()
        held = asyncio.create_task(collect(pool, request("held")))
        await asyncio.sleep(0.02)
        with pytest.raises(APIError) as queued:
            await collect(pool, request("queued", deadline=time.monotonic() + 0.1))
        gate.set()
        await held
        with pytest.raises(APIError) as late:
            await collect(pool, request("late", deadline=time.monotonic() - 1))
        return queued.value, late.value
    queued, late = asyncio.run(main())
    assert queued.status == late.status == 504
    assert "waited for a free slot" in queued.message


# ---------------------------------------------------------------- real gRPC


def run_servers(n: int, scenario, **client_options):
    """`scenario(engines, servers, pool)` over n worker servers (FakeEngine) behind one GroupPool."""
    async def main():
        engines = [FakeEngine() for _ in range(n)]
        servers = [await serve_worker(e, "127.0.0.1", 0, INFO) for e in engines]
        groups = [(f"g{i}", f"127.0.0.1:{s.k2serve_port}") for i, s in enumerate(servers)]
        pool = GroupPool(StaticDiscovery(groups), Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(poll_interval_s=0.2),
                         client_factory=lambda address: WorkerClient(address, **client_options))
        await pool.refresh()
        try:
            return await scenario(engines, servers, pool)
        finally:
            await pool.close()
            for server in servers:
                await server.stop(0)
    return asyncio.run(main())


def test_a_connection_reset_mid_stream_migrates_over_grpc_without_a_lost_or_repeated_token():
    async def scenario(engines, servers, pool):
        stream = pool.generate(GenerateParams("m", (1, 2, 3), max_tokens=40))
        got = [await stream.__anext__() for _ in range(5)]
        first = 0 if engines[0].active else 1
        await servers[first].stop(0)  # the group's process is gone: its connection resets
        got += [item async for item in stream]
        return first, engines, got
    first, engines, got = run_servers(2, scenario)
    assert tokens_of(got) == list(range(40))
    assert got[-1].completion_tokens == 40 and got[-1].prompt_tokens == 3
    other = engines[1 - first]
    assert len(other.continued["m"]) >= 5 and other.continued["m"] == tuple(range(len(other.continued["m"])))


def test_a_deadline_ends_a_request_with_504_and_aborts_it_on_the_worker():
    async def scenario(engines, servers, pool):
        start = time.monotonic()
        with pytest.raises(WorkerError) as err:
            await collect(pool, GenerateParams("d", (1, 2), max_tokens=1000, deadline=start + 0.4))
        took = time.monotonic() - start
        for _ in range(50):
            if not engines[0].active:
                break
            await asyncio.sleep(0.02)
        return err.value, took, engines[0]
    err, took, engine = run_servers(1, scenario)
    assert err.status == 504 and took < 5
    assert "d" in engine.aborted and not engine.active


def test_a_consumer_that_stops_reading_is_cut_off_and_the_worker_request_aborted():
    async def scenario(engines, servers, pool):
        stream = pool.generate(GenerateParams("s", (1, 2), max_tokens=1000))
        await stream.__anext__()
        for _ in range(200):  # not reading: the worker's responses pile up, then the request is cut
            if "s" in engines[0].aborted:
                break
            await asyncio.sleep(0.02)
        aborted_while_unread = "s" in engines[0].aborted
        with pytest.raises(WorkerError) as err:
            async for _ in stream:
                pass
        return aborted_while_unread, err.value
    aborted, err = run_servers(1, scenario, max_buffered_responses=8)
    assert aborted and err.status == 408 and "did not read its stream" in err.message


# ---------------------------------------------------------------- through the HTTP APIs


@pytest.mark.parametrize("stream", [True, False])
def test_a_migrated_request_answers_exactly_what_an_uninterrupted_one_does(tokenizer_and_template, stream):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": len(TOKENS),
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}

    async def answer(fleet: Fleet) -> str:
        pool = pool_over(fleet)
        await pool.refresh()
        resp = await api_call(pool, tokenizer_and_template, "/v1/chat/completions", body)
        assert resp.status_code == 200
        return resp.text

    def content(text: str) -> tuple:
        if not stream:
            reply = json.loads(text)
            return reply["choices"][0]["message"]["content"], reply["usage"]
        payloads = sse_payloads(text)
        assert not any("error" in p for p in payloads)
        return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"]), \
            payloads[-1]["usage"]

    migrated = Fleet(a=FakeGroup("h:1", TOKENS, fail_after=3), b=FakeGroup("h:2", TOKENS))
    whole = asyncio.run(answer(Fleet(a=FakeGroup("h:1", TOKENS))))
    moved = asyncio.run(answer(migrated))
    assert migrated.groups["b"].seen[0].output_token_ids == TOKENS[:3]
    assert content(moved) == content(whole) and content(whole)[0]


def test_x_request_timeout_becomes_the_requests_deadline(tokenizer_and_template):
    tokenizer, template = tokenizer_and_template
    body = {"model": "tiny-k2", "prompt": "count", "max_tokens": 1000}

    async def scenario(engines, servers, pool):
        app = create_app(RouterConfig(max_request_timeout_s=60), pool, tokenizer, template)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            post = lambda headers, **extra: client.post("/v1/completions", json={**body, **extra},  # noqa: E731
                                                        headers=headers)
            bad = await post({"x-request-timeout": "soon"})
            negative = await post({"x-request-timeout": "-1"})
            start = time.monotonic()
            late = await post({"x-request-timeout": "0.3"})
            streamed = await post({"x-request-timeout": "0.3"}, stream=True)
            took = time.monotonic() - start
        return bad, negative, late, streamed, took, engines[0]
    bad, negative, late, streamed, took, engine = run_servers(1, scenario)
    assert bad.status_code == negative.status_code == 400 and "x-request-timeout" in bad.json()["error"]["message"]
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"
    assert streamed.status_code == 200 and sse_payloads(streamed.text)[-1]["error"]["type"] == "timeout_error"
    assert took < 10 and not engine.active and len(engine.aborted) >= 2
