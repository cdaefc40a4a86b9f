"""AsyncEngine health: heartbeats while idle, a hung step or heartbeat fails the engine within its hang
timeout (streams end with a 503, new requests are refused), a step that breaks the group's collectives
fails it, an ordinary step failure does not, and a drain finishes or ends what is in flight.

The engine is the real Engine over a ModelRunner whose steps and heartbeats a test can stall or break
(the layer below a worker group's engine: rank 0's runner, which in a group waits on every rank)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from k2serve.worker.async_engine import AsyncEngine
from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.health import DRAINING, FAILED, SERVING
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.request import RequestRejected, SamplingParams
from test_engine import FakeModel, fake_vocab

LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
BLOCKS = 256


class GroupRunner(ModelRunner):
    """A runner whose steps can hang (`stall` set until `release`) or raise, like rank 0 of a group whose
    peer stopped or whose collectives broke; counts heartbeats."""

    def __init__(self):
        super().__init__(FakeModel(), BLOCKS, 4, kv_caches=[torch.zeros(BLOCKS, 4, 2, dtype=torch.float64)])
        self.heartbeats = 0
        self.stall = threading.Event()
        self.release = threading.Event()
        self.fail_steps = False
        self.fail_heartbeats = False
        self.step_s = 0.0

    def execute(self, plan):
        self._wait()
        time.sleep(self.step_s)
        if self.fail_steps:
            raise RuntimeError("Timed out waiting 3000ms for recv operation to complete")
        return super().execute(plan)

    def heartbeat(self) -> None:
        self._wait()
        if self.fail_heartbeats:
            raise RuntimeError("Application timeout caused pair closure")
        self.heartbeats += 1

    def _wait(self) -> None:
        if self.stall.is_set():
            self.release.wait(30)


def make(heartbeat_s=0.05, hang_s=0.5) -> tuple[AsyncEngine, Engine, GroupRunner]:
    runner = GroupRunner()
    engine = Engine(EngineConfig(block_size=4), runner, fake_vocab())
    return AsyncEngine(engine, heartbeat_interval_s=heartbeat_s, hang_timeout_s=hang_s), engine, runner


def until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)
    return predicate()


def test_an_idle_engine_runs_heartbeats_through_the_runner():
    aengine, _, runner = make()
    aengine.start()
    try:
        assert until(lambda: runner.heartbeats >= 3)
        assert aengine.health().state == SERVING
    finally:
        aengine.shutdown()


def test_a_hung_step_fails_the_engine_ends_its_streams_with_503_and_refuses_new_requests():
    aengine, _, runner = make()

    async def main():
        stream = aengine.generate("victim", [1, 2, 3], LONG)
        await stream.__anext__()
        runner.stall.set()  # a peer rank stopped: the next step never finishes
        outs = [out async for out in stream]
        assert outs[-1].finish_reason == "error" and outs[-1].error_status == 503
        assert "hang" in outs[-1].error
        with pytest.raises(RequestRejected) as err:
            async for _ in aengine.generate("late", [1], LONG):
                pass
        assert err.value.status == 503

    try:
        asyncio.run(asyncio.wait_for(main(), 20))
        assert aengine.health().state == FAILED and "hang" in aengine.health().reason
    finally:
        runner.release.set()
        aengine.shutdown()


def test_a_hung_heartbeat_fails_an_idle_engine():
    aengine, _, runner = make()
    runner.stall.set()
    aengine.start()
    try:
        assert until(lambda: aengine.health().state == FAILED)
        assert runner.heartbeats == 0
    finally:
        runner.release.set()
        aengine.shutdown()


def test_a_step_that_breaks_the_collectives_fails_the_engine_but_an_ordinary_failure_does_not():
    aengine, engine, runner = make(heartbeat_s=60)

    async def one(rid):
        return [out async for out in aengine.generate(rid, [1, 2], SamplingParams(temperature=0, max_tokens=3))]

    try:
        runner.fail_steps = True  # the step fails, the group still steps: keep serving
        assert asyncio.run(one("a"))[-1].finish_reason == "error"
        assert aengine.health().state == SERVING
        runner.fail_heartbeats = True  # the step fails and so does the heartbeat after it: broken
        assert asyncio.run(one("b"))[-1].error_status == 503
        assert aengine.health().state == FAILED and "heartbeat" in aengine.health().reason
    finally:
        aengine.shutdown()


def test_drain_lets_running_requests_finish_and_refuses_new_ones():
    aengine, engine, _ = make()
    short = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def main():
        stream = aengine.generate("running", [1, 2, 3], short)
        await stream.__anext__()
        draining = asyncio.create_task(aengine.drain(30.0))
        await asyncio.sleep(0)
        assert aengine.health().state == DRAINING
        with pytest.raises(RequestRejected) as err:
            async for _ in aengine.generate("late", [1], short):
                pass
        assert err.value.status == 503
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 30
        assert await asyncio.wait_for(draining, 10) == 0

    try:
        asyncio.run(main())
    finally:
        aengine.shutdown()


def test_drain_past_its_grace_ends_what_is_left_with_503_and_frees_its_blocks():
    aengine, engine, runner = make()
    runner.step_s = 0.01  # 500 tokens take seconds, the grace a fraction of one

    async def main():
        stream = aengine.generate("long", [1, 2, 3], LONG)
        await stream.__anext__()
        assert await aengine.drain(0.2) == 1
        outs = [out async for out in stream]
        assert outs[-1].finish_reason == "error" and outs[-1].error_status == 503

    try:
        asyncio.run(main())
        assert until(lambda: engine.scheduler.kv_cache.num_free_blocks == BLOCKS and not engine.scheduler.requests)
    finally:
        aengine.shutdown()
