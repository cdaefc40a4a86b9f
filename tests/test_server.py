"""WorkerServicer over a fake AsyncEngine, driven through the real router WorkerClient (grpc.aio)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from k2serve.router.pool.worker import Finished, GenerateParams, GuidedRequest, TokenChunk, WorkerError
from k2serve.router.pool.worker_client import WorkerClient, request_to_proto
from k2serve.v1 import worker_pb2, worker_pb2_grpc
from k2serve.worker.engine import EngineLoad
from k2serve.worker.health import FAILED, SERVING, EngineHealth
from k2serve.worker.request import GuidedSpec, RequestOutput, RequestRejected, SamplingParams, TokenLogprob
from k2serve.worker.server import ModelInfo, params_from_request, serve_worker

INFO = ModelInfo("tiny-k2", 4096, 1000, (163585, 163586), "sha256:abc")


class FakeEngine:  # a ServedEngine
    """Yields token i at step i (a continuation of k tokens starts at step k); prompt [999] is rejected
    (429); [500] crashes; records aborts."""

    def __init__(self):
        self.active: dict[str, int] = {}
        self.aborted: list[str] = []
        self.seen: dict[str, dict] = {}
        self.continued: dict[str, tuple[int, ...]] = {}  # request id -> its output_token_ids
        self.state = EngineHealth(SERVING)

    async def generate(self, rid, prompt, params: SamplingParams, output_ids=()):
        if prompt == [999]:
            raise RequestRejected("waiting queue is full", 429)
        if prompt == [500]:
            raise RuntimeError("boom")
        self.seen[rid.split("@")[0]] = params  # the router's session sends "<id>@<session>.<n>"
        self.continued[rid.split("@")[0]] = tuple(output_ids)
        self.active[rid] = len(prompt)
        try:
            n = params.max_tokens
            for i in range(len(output_ids), n):
                await asyncio.sleep(0.05 if n > 20 else 0.0)
                lps = [TokenLogprob(i, -0.5, [(i, -0.5), (7, -1.5)])] if params.logprobs else None
                last = i == n - 1
                yield RequestOutput(rid, [i], lps, len(prompt), i + 1, 0, last, "length" if last else None)
        finally:
            self.active.pop(rid, None)

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid.split("@")[0])
        return self.active.pop(rid, None) is not None

    def get_load(self) -> EngineLoad:
        return EngineLoad(len(self.active), 0, 0.1 * len(self.active), 0.0, 0)

    def health(self) -> EngineHealth:
        return self.state

    async def drain(self, grace_s: float) -> int:
        return len(self.active)


def run(scenario):
    async def main():
        engine = FakeEngine()
        server = await serve_worker(engine, "127.0.0.1", 0, INFO)
        client = WorkerClient(f"127.0.0.1:{server.k2serve_port}")
        try:
            return await scenario(engine, client)
        finally:
            await client.close()
            await server.stop(0)
    return asyncio.run(main())


async def collect(client, params):
    return [item async for item in client.generate(params)]


def test_generate_streams_chunks_then_complete():
    async def scenario(engine, client):
        items = await collect(client, GenerateParams("r1", (1, 2, 3), max_tokens=3, temperature=0.0, logprobs=2))
        assert engine.seen["r1"] == SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=2)
        return items
    items = run(scenario)
    assert [c.token_ids for c in items if isinstance(c, TokenChunk)] == [(0,), (1,), (2,)]
    assert items[0].logprobs[0].top == ((0, -0.5), (7, -1.5))
    assert items[-1] == Finished("length", None, 3, 3, 0)


def test_unset_sampling_fields_keep_engine_defaults():
    params = params_from_request(request_to_proto(GenerateParams("r", (1,), top_p=None, temperature=0.0)))
    assert params == SamplingParams(temperature=0.0)


def test_guided_specs_round_trip():
    tools = ({"type": "function", "function": {"name": "f", "parameters": {}}},)
    guided = GuidedRequest("tool_call", tools=tools, mode="named", name="f", first_index=2)
    params = params_from_request(request_to_proto(GenerateParams("r", (1,), guided=guided)))
    assert params.guided == GuidedSpec("tool_call", tools=tools, mode="named", name="f", first_index=2)
    guided = GuidedRequest("json_schema", json_schema='{"type":"object"}')
    assert params_from_request(request_to_proto(GenerateParams("r", (1,), guided=guided))).guided == \
        GuidedSpec("json_schema", schema='{"type":"object"}')
    json_object = params_from_request(request_to_proto(GenerateParams("r", (1,), guided=GuidedRequest("json_object"))))
    assert json_object.guided == GuidedSpec("json_object")


@pytest.mark.parametrize("prompt,status", [((999,), 429), ((500,), 500), ((), 400)])
def test_rejections_are_in_stream_errors_and_server_keeps_serving(prompt, status):
    async def scenario(engine, client):
        with pytest.raises(WorkerError) as err:
            await collect(client, GenerateParams("bad", prompt, max_tokens=2))
        assert err.value.status == status
        ok = await collect(client, GenerateParams("good", (1,), max_tokens=2))
        assert isinstance(ok[-1], Finished)
    run(scenario)


def test_client_cancel_aborts_request_and_frees_it():
    async def scenario(engine, client):
        stream = client.generate(GenerateParams("long", (1, 2), max_tokens=1000))
        first = await stream.__anext__()
        assert isinstance(first, TokenChunk)
        assert (await client.get_load()).num_running == 1
        await stream.aclose()
        for _ in range(100):
            if "long" in engine.aborted and not engine.active:
                break
            await asyncio.sleep(0.02)
        assert "long" in engine.aborted and not engine.active
        assert (await client.get_load()).kv_cache_usage == 0.0
    run(scenario)


async def raw_generate(client, request: worker_pb2.GenerateRequest) -> list[worker_pb2.GenerateResponse]:
    """The Generate RPC's responses on a channel of its own to the client's worker."""
    async with grpc.aio.insecure_channel(client.address) as channel:
        return [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request)]


def test_a_continuation_goes_on_after_its_output_tokens():
    async def scenario(engine, client):
        request = worker_pb2.GenerateRequest(request_id="c", prompt_token_ids=[1, 2],
                                             sampling=worker_pb2.SamplingParams(max_tokens=5),
                                             output_token_ids=[0, 1])
        responses = await raw_generate(client, request)
        assert engine.continued["c"] == (0, 1)
        return responses
    responses = run(scenario)
    assert [list(r.chunk.token_ids) for r in responses[:-1]] == [[2], [3], [4]]
    assert responses[-1].complete.completion_tokens == 5


def test_a_request_past_its_deadline_is_aborted_with_504():
    async def scenario(engine, client):
        request = worker_pb2.GenerateRequest(request_id="slow", prompt_token_ids=[1, 2],
                                             sampling=worker_pb2.SamplingParams(max_tokens=1000), timeout_ms=300)
        responses = await raw_generate(client, request)
        assert "slow" in engine.aborted and not engine.active
        quick = worker_pb2.GenerateRequest(request_id="quick", prompt_token_ids=[1],
                                           sampling=worker_pb2.SamplingParams(max_tokens=2), timeout_ms=60_000)
        return responses, await raw_generate(client, quick)
    slow, quick = run(scenario)
    assert 1 <= len(slow) - 1 < 1000 and all(r.WhichOneof("response") == "chunk" for r in slow[:-1])
    assert slow[-1].error.status == 504 and "deadline of 300 ms" in slow[-1].error.message
    assert quick[-1].complete.finish_reason == "length"


def test_abort_model_info_and_health():
    async def scenario(engine, client):
        assert await client.health()
        info = await client.get_model_info()
        assert (info.model_name, info.context_length, info.stop_token_ids) == ("tiny-k2", 4096, (163585, 163586))
        assert await client.abort("unknown") is False
    run(scenario)


def test_grpc_health_follows_the_engines_health():
    """A hung or failed engine answers NOT_SERVING (routers stop sending), and SERVING again only if it is."""
    async def scenario(engine, client):
        assert await client.health()
        engine.state = EngineHealth(FAILED, "a step has run for 31s: a rank hangs")
        for _ in range(100):
            if not await client.health():
                break
            await asyncio.sleep(0.05)
        assert not await client.health()
        engine.state = EngineHealth(SERVING)
        for _ in range(100):
            if await client.health():
                break
            await asyncio.sleep(0.05)
        assert await client.health()
    run(scenario)


def test_health_false_when_no_server():
    async def scenario():
        client = WorkerClient("127.0.0.1:1")
        try:
            assert not await client.health(timeout=0.5)
            with pytest.raises(WorkerError) as err:
                await collect(client, GenerateParams("x", (1,)))
            assert err.value.status == 503
        finally:
            await client.close()
    asyncio.run(scenario())


# ---------------------------------------------------------------- the real engine on the tiny checkpoint

from router_harness import WorkerThread  # noqa: E402


@pytest.fixture(scope="module")
def real_worker(tiny_model_dir):
    with WorkerThread(tiny_model_dir) as worker:
        yield worker


async def load_when_idle(client, timeout_s: float = 10.0):
    """The worker's load once it runs nothing and holds no blocks, or the last reading after `timeout_s`."""
    for _ in range(int(timeout_s / 0.05)):
        load = await client.get_load()
        if load.num_running == 0 and load.kv_cache_usage == 0.0:
            break
        await asyncio.sleep(0.05)
    return load


def with_client(worker, scenario):
    async def main():
        client = WorkerClient(worker.address)
        try:
            return await scenario(client)
        finally:
            await client.close()
    return asyncio.run(main())


def test_real_engine_greedy_is_deterministic_with_logprobs(real_worker):
    async def scenario(client):
        runs = []
        for rid in ("g1", "g2"):
            items = await collect(client, GenerateParams(rid, (5, 6, 7, 8), max_tokens=6, temperature=0.0, logprobs=3))
            runs.append(items)
        return runs
    a, b = with_client(real_worker, scenario)
    ids = lambda items: [t for c in items if isinstance(c, TokenChunk) for t in c.token_ids]
    assert ids(a) == ids(b) and len(ids(a)) <= 6
    assert a[-1].finish_reason in ("stop", "length") and a[-1].prompt_tokens == 4
    lps = [lp for c in a if isinstance(c, TokenChunk) for lp in c.logprobs]
    assert len(lps) == len(ids(a)) and all(len(lp.top) == 3 for lp in lps)


def test_real_engine_rejects_bad_params_in_stream(real_worker):
    async def scenario(client):
        with pytest.raises(WorkerError) as err:
            await collect(client, GenerateParams("bad", (1, 2), max_tokens=4, top_p=5.0))
        assert err.value.status == 400 and "top_p" in err.value.message
        with pytest.raises(WorkerError) as err:
            await collect(client, GenerateParams("big", (10**6,), max_tokens=4))
        assert err.value.status == 400
        assert isinstance((await collect(client, GenerateParams("ok", (1, 2), max_tokens=2)))[-1], Finished)
    with_client(real_worker, scenario)


def test_real_engine_cancel_frees_kv_cache(real_worker):
    async def scenario(client):
        stream = client.generate(GenerateParams("long", tuple(range(1, 40)), max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        load = await client.get_load()
        assert load.num_running == 1 and load.kv_cache_usage > 0
        await stream.aclose()
        load = await load_when_idle(client)
        assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)
    with_client(real_worker, scenario)


def test_real_model_info(real_worker):
    info = with_client(real_worker, lambda client: client.get_model_info())
    assert info.context_length == 1024 and info.vocab_size == 1280
    assert set(info.stop_token_ids) == {1025, 1026} and info.tokenizer_id.startswith("sha256:")


def test_real_engine_a_router_that_goes_away_frees_every_block(real_worker):
    async def scenario(probe):
        router = WorkerClient(real_worker.address)  # its session carries all three requests
        streams = [router.generate(GenerateParams(f"gone{i}", tuple(range(1, 30 + i)), max_tokens=500,
                                                  ignore_eos=True)) for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        load = await probe.get_load()
        assert load.num_running == 3 and load.kv_cache_usage > 0
        await router.close()  # no aborts sent: ending the session must abort them
        load = await load_when_idle(probe)
        assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)
    with_client(real_worker, scenario)
