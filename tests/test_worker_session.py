"""The Session RPC: many requests multiplexed over one gRPC call, batched per engine step.

Driven by the real router RequestMux / WorkerClient and by the raw generated stub against the real
grpc.aio server, over a fake engine that steps like the real one: every `step_s` it emits one token for
every running request, all in the same event-loop pass.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from k2serve.v1 import worker_pb2, worker_pb2_grpc
from k2serve.router.pool.worker import Finished, GenerateParams, TokenChunk, WorkerError
from k2serve.router.pool.worker_client import WorkerClient, request_to_proto
from k2serve.worker.engine import EngineLoad
from k2serve.worker.health import SERVING, EngineHealth
from k2serve.worker.request import RequestOutput, SamplingParams
from k2serve.worker.server import ModelInfo, params_from_request, serve_worker

INFO = ModelInfo("tiny-k2", 4096, 1000, (2,), "sha256:abc")


class SteppingEngine:
    """A continuous batch: one step every `step_s` gives each running request its next token."""

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.running: dict[str, asyncio.Queue] = {}
        self.aborted: list[str] = []
        self._ticker: asyncio.Task | None = None

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams, output_ids=()):
        if rid in self.running:
            from k2serve.worker.request import RequestRejected
            raise RequestRejected(f"request id {rid!r} is already in use")
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())
        ticks = self.running[rid] = asyncio.Queue()
        try:
            n = params.max_tokens
            for i in range(n):
                await ticks.get()
                last = i == n - 1
                yield RequestOutput(rid, [100 + i], None, len(prompt), i + 1, 0, last, "length" if last else None)
        finally:
            self.running.pop(rid, None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            for ticks in list(self.running.values()):
                ticks.put_nowait(None)

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid)
        return rid in self.running

    def get_load(self) -> EngineLoad:
        return EngineLoad(len(self.running), 0, 0.0, 0.0, 0)

    def health(self) -> EngineHealth:
        return EngineHealth(SERVING)

    async def drain(self, grace_s: float) -> int:
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return len(self.running)


def run(scenario, step_s: float = 0.01):
    async def main():
        engine = SteppingEngine(step_s)
        server = await serve_worker(engine, "127.0.0.1", 0, INFO)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.k2serve_port}")
        try:
            return await scenario(engine, server, worker_pb2_grpc.WorkerStub(channel))
        finally:
            await channel.close()
            await server.stop(0)
    return asyncio.run(main())


def generate_msg(rid: str, n: int, prompt=(1, 2, 3)) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(generate=[request_to_proto(GenerateParams(rid, prompt, max_tokens=n))])


async def until_none(outbox: asyncio.Queue):
    """A Session's request stream fed from a queue; None half-closes it."""
    while (msg := await outbox.get()) is not None:
        yield msg


async def raw_session(stub, *messages) -> list:
    """Send `messages` on a raw Session, half-close, and return every response of the call."""
    outbox: asyncio.Queue = asyncio.Queue()
    for msg in (*messages, None):
        outbox.put_nowait(msg)
    return [r async for batch in stub.Session(until_none(outbox)) for r in batch.responses]


@contextlib.asynccontextmanager
async def connected(server):
    """A router's WorkerClient to `server`, closed on the way out."""
    client = WorkerClient(f"127.0.0.1:{server.k2serve_port}")
    try:
        yield client
    finally:
        await client.close()


async def until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_one_step_of_many_requests_travels_in_one_message():
    async def scenario(engine, server, stub):
        outbox: asyncio.Queue = asyncio.Queue()
        for i in range(16):
            outbox.put_nowait(generate_msg(f"r{i}", 8))
        call = stub.Session(until_none(outbox))
        batches, per_request = 0, {}
        async for batch in call:
            batches += 1
            for response in batch.responses:
                per_request.setdefault(response.request_id, []).append(response)
            if sum(r[-1].WhichOneof("response") == "complete" for r in per_request.values()) == 16:
                outbox.put_nowait(None)  # half-close: the worker ends the call once all are done
        assert await call.code() == grpc.StatusCode.OK
        return batches, per_request
    batches, per_request = run(scenario)
    assert sorted(per_request) == sorted(f"r{i}" for i in range(16))
    for responses in per_request.values():
        assert [t for r in responses[:-1] for t in r.chunk.token_ids] == list(range(100, 108))
        assert responses[-1].complete.finish_reason == "length" and responses[-1].complete.completion_tokens == 8
    # 16 requests x (8 chunks + 1 complete) = 144 responses in about 8 steps' worth of messages
    assert batches <= 24, batches


def test_per_request_generate_rpc_still_serves_other_clients():
    async def scenario(engine, server, stub):
        request = request_to_proto(GenerateParams("solo", (1,), max_tokens=3))
        responses = [r async for r in stub.Generate(request)]
        assert [r.WhichOneof("response") for r in responses] == ["chunk"] * 3 + ["complete"]
        assert all(r.request_id == "" for r in responses)
        call = stub.Generate(request_to_proto(GenerateParams("cancelled", (1,), max_tokens=1000)))
        await call.read()
        call.cancel()
        await until(lambda: "cancelled" in engine.aborted and not engine.running)
    run(scenario)


def test_leaving_one_request_aborts_only_it():
    async def scenario(engine, server, stub):
        async with connected(server) as client:
            long = client.generate(GenerateParams("long", (1,), max_tokens=10_000))
            assert isinstance(await long.__anext__(), TokenChunk)
            short = [item async for item in client.generate(GenerateParams("short", (1,), max_tokens=5))]
            assert short[-1] == Finished("length", None, 1, 5, 0)
            await long.aclose()
            await until(lambda: engine.aborted and not engine.running)
            assert [rid.split("@")[0] for rid in engine.aborted] == ["long"]  # on the wire: long@<session>.<n>
    run(scenario)


def test_a_duplicate_id_on_the_raw_session_gets_an_error_and_the_first_keeps_going():
    async def scenario(engine, server, stub):
        responses = await raw_session(stub, generate_msg("dup", 3), generate_msg("dup", 3))
        kinds = [r.WhichOneof("response") for r in responses]
        assert kinds.count("error") == 1 and kinds.count("complete") == 1 and kinds.count("chunk") == 3
        assert next(r for r in responses if r.error.message).error.status == 400
    run(scenario)


def test_ending_the_session_aborts_every_request_in_flight():
    async def scenario(engine, server, stub):
        client = WorkerClient(f"127.0.0.1:{server.k2serve_port}")
        streams = [client.generate(GenerateParams(f"r{i}", (1,), max_tokens=10_000)) for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        assert len(engine.running) == 3
        await client.close()  # the router goes away without aborting anything itself
        await until(lambda: not engine.running)
        assert sorted(rid.split("@")[0] for rid in engine.aborted) == ["r0", "r1", "r2"]
        for stream in streams:
            with pytest.raises(WorkerError) as err:
                async for _ in stream:  # tokens that arrived before the close, then the failure
                    pass
            assert err.value.status == 503
    run(scenario)


def test_a_dead_worker_fails_every_request_in_flight_then_new_ones_fast():
    async def scenario(engine, server, stub):
        async with connected(server) as client:
            streams = [client.generate(GenerateParams(f"r{i}", (1,), max_tokens=10_000)) for i in range(2)]
            for stream in streams:
                await stream.__anext__()
            await server.stop(0)
            for stream in streams:
                with pytest.raises(WorkerError) as err:
                    async for _ in stream:
                        pass
                assert err.value.status == 503
            with pytest.raises(WorkerError) as err:
                await asyncio.wait_for(client.generate(GenerateParams("after", (1,), max_tokens=2)).__anext__(), 10)
            assert err.value.status == 503
    run(scenario)


def test_a_request_that_breaks_the_servicer_fails_alone(monkeypatch):
    from k2serve.worker import server as worker_server

    def params_with_a_bug(request):
        if request.request_id.startswith("boom@"):
            raise KeyError("a bug, not a rejection")
        return params_from_request(request)
    monkeypatch.setattr(worker_server, "params_from_request", params_with_a_bug)

    async def main():
        engine = SteppingEngine()
        server = await serve_worker(engine, "127.0.0.1", 0, INFO)
        client = WorkerClient(f"127.0.0.1:{server.k2serve_port}")
        try:
            with pytest.raises(WorkerError) as err:
                [item async for item in client.generate(GenerateParams("boom", (1,), max_tokens=2))]
            assert err.value.status == 500
            ok = [item async for item in client.generate(GenerateParams("fine", (1,), max_tokens=2))]
            assert ok[-1].finish_reason == "length"
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())


def test_a_reused_id_never_gets_the_tokens_of_the_request_that_had_it():
    async def scenario(engine, server, stub):
        async with connected(server) as client:
            for _ in range(5):
                first = client.generate(GenerateParams("idem", (1,) * 7, max_tokens=10_000))
                await first.__anext__()
                await asyncio.sleep(0.03)  # more of its tokens are on their way when it leaves
                await first.aclose()
                again = [item async for item in client.generate(GenerateParams("idem", (1, 2), max_tokens=3))]
                assert [t for c in again[:-1] for t in c.token_ids] == [100, 101, 102]
                assert all(c.prompt_tokens == 2 for c in again)
        await until(lambda: not engine.running)
    run(scenario)


def test_an_oversized_request_fails_alone(monkeypatch):
    from k2serve.router.pool import worker_session

    monkeypatch.setattr(worker_session, "MAX_REQUEST_BYTES", 1000)

    async def scenario(engine, server, stub):
        async with connected(server) as client:
            other = client.generate(GenerateParams("other", (1,), max_tokens=20))
            await other.__anext__()
            with pytest.raises(WorkerError) as err:
                [item async for item in client.generate(GenerateParams("huge", (1,) * 2000, max_tokens=2))]
            assert err.value.status == 413
            rest = [item async for item in other]
            assert rest[-1] == Finished("length", None, 1, 20, 0)
    run(scenario)


def test_the_worker_takes_messages_as_large_as_the_router_sends():
    async def scenario(engine, server, stub):
        big = generate_msg("big", 2)
        big.generate[0].guided.regex = "a" * (5 * 1024 * 1024)  # over gRPC's 4 MiB default
        responses = await raw_session(stub, big)
        assert responses[-1].complete.completion_tokens == 2
    run(scenario)


def test_stopping_the_worker_drains_its_sessions():
    from k2serve.worker.server import stop_worker

    async def scenario(engine, server, stub):
        async with connected(server) as client:
            running = client.generate(GenerateParams("running", (1,), max_tokens=40))
            await running.__anext__()
            stopping = asyncio.create_task(stop_worker(server, 30.0))
            await asyncio.sleep(0.05)
            with pytest.raises(WorkerError) as err:  # refused so that a router retries it elsewhere
                [item async for item in client.generate(GenerateParams("late", (1,), max_tokens=2))]
            assert err.value.status == 503
            rest = [item async for item in running]  # the request in flight finishes
            assert rest[-1] == Finished("length", None, 1, 40, 0)
            await asyncio.wait_for(stopping, 10)  # without waiting out the 30 s grace
            assert not await client.health(timeout=1)
    run(scenario)


def test_a_session_opened_while_the_worker_drains_is_refused_too():
    async def scenario(engine, server, stub):
        server.k2serve_servicer.drain()  # stop_worker's first half: gRPC itself still takes new calls
        async with connected(server) as client:
            with pytest.raises(WorkerError) as err:
                [item async for item in client.generate(GenerateParams("later", (1,), max_tokens=2))]
            assert err.value.status == 503  # refused or ended at once: either way a router retries elsewhere
    run(scenario)


def test_a_failed_session_leaves_no_task_behind():
    async def scenario(engine, server, stub):
        async with connected(server) as client:
            stream = client.generate(GenerateParams("r", (1,), max_tokens=10_000))
            await stream.__anext__()
            await server.stop(0)
            with pytest.raises(WorkerError):
                async for _ in stream:
                    pass
            await asyncio.sleep(0.1)
            left = [t for t in asyncio.all_tasks() if "request_iterator" in repr(t)]
            assert not left, left  # gRPC's task draining the old session's outbox ended with it
    run(scenario)


def test_outputs_without_tokens_send_no_empty_chunks():
    class Sparse(SteppingEngine):
        async def generate(self, rid, prompt, params, output_ids=()):
            yield RequestOutput(rid, [], None, len(prompt), 0, 0)
            yield RequestOutput(rid, [5], None, len(prompt), 1, 0)
            yield RequestOutput(rid, [], None, len(prompt), 1, 0, True, "stop", stop_token_id=2)

    async def main():
        server = await serve_worker(Sparse(), "127.0.0.1", 0, INFO)
        client = WorkerClient(f"127.0.0.1:{server.k2serve_port}")
        try:
            return [item async for item in client.generate(GenerateParams("s", (1,), max_tokens=4))]
        finally:
            await client.close()
            await server.stop(0)
    items = asyncio.run(main())
    assert items == [TokenChunk((5,), (), 1, 1, 0), Finished("stop", 2, 1, 1, 0)]


def test_a_full_batch_holds_the_requests_until_the_write_goes_out(monkeypatch):
    from k2serve.worker import session as worker_session

    monkeypatch.setattr(worker_session, "MAX_BATCH_RESPONSES", 8)
    produced = []

    async def responses(request, new):  # an engine far faster than the router reads
        for i in range(100):
            new().chunk.token_ids.append(i)
            produced.append(i)
            yield None
            await asyncio.sleep(0)

    class SlowRouter:
        def __init__(self):
            self.release, self.written = asyncio.Event(), []

        async def write(self, batch):
            await self.release.wait()
            self.written.append(len(batch.responses))

    async def main():
        context = SlowRouter()

        async def requests():
            yield generate_msg("r", 100)

        session = worker_session.WorkerSession(responses)
        task = asyncio.create_task(session.run(requests(), context))
        await asyncio.sleep(0.1)
        held = len(produced)  # first batch in the stuck write, the next one full, the producer waiting
        context.release.set()
        await asyncio.wait_for(task, 5)
        return held, context.written

    held, written = asyncio.run(main())
    assert held <= 2 * 8 + 1, held
    assert sum(written) == 100 and max(written) <= 8 + 1


def test_requests_queued_together_leave_in_one_message():
    from k2serve.router.pool.worker_session import RequestMux

    class Call:  # the router side alone: what the mux hands gRPC to send
        def __init__(self, requests):
            self.requests = requests
            self.ended = asyncio.get_running_loop().create_future()

        def __aiter__(self):
            return self

        async def __anext__(self):
            await self.ended  # no responses; cancel() ends the call as grpc.aio does

        def cancel(self):
            return self.ended.cancel()

        def cancelled(self):
            return self.ended.cancelled()

    class Stub:
        def Session(self, requests):
            self.call = Call(requests)
            return self.call

    async def main():
        stub = Stub()
        mux = RequestMux(stub, lambda exc, reason: WorkerError(reason, 503))
        streams = [mux.generate(request_to_proto(GenerateParams(f"b{i}", (1,), max_tokens=2))) for i in range(5)]
        pending = [asyncio.create_task(s.__anext__()) for s in streams]
        await asyncio.sleep(0.01)
        burst = await stub.call.requests.__anext__()
        pending[0].cancel()  # one caller gives up: its abort goes in the next message
        await asyncio.sleep(0.01)
        after = await stub.call.requests.__anext__()
        await mux.close()
        for task in pending[1:]:
            task.cancel()
        return burst, after

    burst, after = asyncio.run(main())
    assert [g.request_id.split("@")[0] for g in burst.generate] == [f"b{i}" for i in range(5)] and not burst.abort
    assert not after.generate and [a.request_id.split("@")[0] for a in after.abort] == ["b0"]


def test_an_inbox_hands_over_in_order_and_survives_a_cancelled_wait():
    from k2serve.router.pool.worker_session import Inbox

    async def run():
        inbox = Inbox()
        waiting = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        waiting.cancel()  # a request left while it waited: nothing may be lost or handed to it
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        later = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        for item in ("a", "b", "c"):
            inbox.put(item)
        return [await later, await inbox.get(), await inbox.get()]

    assert asyncio.run(run()) == ["a", "b", "c"]
