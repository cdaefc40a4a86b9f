"""Worker groups on real Ray (gloo, gRPC) when a rank hangs, when rank 0 gets SIGTERM, and during a rolling
restart under load: a SIGSTOPped follower makes the group say NOT_SERVING and end its streams with a 503
within its hang timeout; SIGTERM (through `k2serve drain`) lets the request in flight finish, refuses new
ones and ends the process; a rolling restart of two groups loses no request of a steady load."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from k2serve.cluster.config import ClusterConfig, ControllerSection, GroupSection, ModelSection
from k2serve.cluster.controller import Controller
from k2serve.cluster.drain_cli import drain
from k2serve.cluster.group import WorkerGroup
from k2serve.cluster.pid_files import start_time
from k2serve.cluster.rank_actor import ServeSpec
from k2serve.router.pool.balancer import Balancer, BalancerConfig
from k2serve.router.pool.discovery import CallableDiscovery, GroupInfo
from k2serve.router.pool.group_pool import GroupPool, GroupPoolConfig
from k2serve.router.pool.worker import Finished, GenerateParams, TokenChunk, WorkerError
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.worker.config import EngineConfig
from k2serve.worker.health import DRAINING, FAILED

ENGINE = EngineConfig(num_kv_blocks=96, block_size=16, max_num_seqs=8, max_num_batched_tokens=128)
# Hangs are found by the engine's watchdog within hang_timeout_s, well before the controller's 2 s pings.
TWO_RANKS = GroupSection(name="hang", tp=2, ep=2, collective_timeout_s=8, heartbeat_interval_s=0.3, hang_timeout_s=1.5)


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)
    return predicate()


async def until_health(client: WorkerClient, serving: bool, timeout_s: float = 30.0) -> bool:
    for _ in range(int(timeout_s / 0.1)):
        if await client.health(timeout=1.0) == serving:
            return True
        await asyncio.sleep(0.1)
    return False


def ready(group: WorkerGroup) -> int:
    """The status of rank 0's readiness probe (what the Kubernetes readinessProbe reads)."""
    return httpx.get(f"http://{group.metrics_address}/ready", timeout=5).status_code


def scrape_healthy(group: WorkerGroup) -> float:
    text = httpx.get(f"http://{group.metrics_address}/metrics", timeout=5).text
    line = next(l for l in text.splitlines() if l.startswith("k2serve_worker_healthy{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
def group(ray_session, tiny_model_dir, tmp_path):
    g = WorkerGroup(TWO_RANKS, str(tiny_model_dir), ENGINE).start()
    g.serve(ServeSpec(metrics_port=0, drain_timeout_s=30, pid_dir=str(tmp_path / "pids")))
    yield g
    for pid in g.pids[1:]:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    g.stop(None)


def test_a_stopped_follower_fails_the_group_within_its_hang_timeout(group):
    assert scrape_healthy(group) == 1.0 and ready(group) == 200

    async def scenario():
        client = WorkerClient(group.address)
        try:
            stream = client.generate(GenerateParams("victim", (5, 6, 7), max_tokens=900, temperature=0.0,
                                                    ignore_eos=True))
            assert isinstance(await stream.__anext__(), TokenChunk)
            os.kill(group.pids[1], signal.SIGSTOP)
            with pytest.raises(WorkerError) as err:
                async for _ in stream:
                    pass
            assert await until_health(client, serving=False)
            return err.value
        finally:
            await client.close()

    err = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert err.status == 503 and "hang" in err.message, err.message  # the worker's own verdict, not a reset
    assert scrape_healthy(group) == 0.0 and ready(group) == 503
    health = group.health()
    assert health.state == FAILED


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_ends_the_process(group, tmp_path):
    pid_dir = tmp_path / "pids"
    assert len(list(pid_dir.glob("*.pid"))) == 1  # rank 0 wrote its pid file
    rank0 = group.pids[0]
    signalled = []

    async def scenario():
        client = WorkerClient(group.address)
        try:
            stream = client.generate(GenerateParams("running", (5, 6, 7), max_tokens=60, temperature=0.0,
                                                    ignore_eos=True))
            first = await stream.__anext__()
            threading.Thread(target=lambda: signalled.append(drain(str(pid_dir), 90)), daemon=True).start()
            assert await until_health(client, serving=False)
            assert group.health().state == DRAINING and ready(group) == 503
            with pytest.raises(WorkerError) as late:
                [item async for item in client.generate(GenerateParams("late", (1, 2), max_tokens=4))]
            rest = [item async for item in stream]
            return first, rest, late.value
        finally:
            await client.close()

    first, rest, late = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert late.status == 503
    tokens = list(first.token_ids) + [t for item in rest if isinstance(item, TokenChunk) for t in item.token_ids]
    assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "length" and len(tokens) == 60
    assert wait_for(lambda: signalled, 90) and signalled[0] == (1, 0)  # drain returned once rank 0 exited
    assert start_time(rank0) is None  # drain returned once the process had exited
    assert group.health().state == FAILED
    assert not list(pid_dir.glob("*.pid"))


def test_a_rolling_restart_under_steady_load_loses_no_request(ray_session, tiny_model_dir):
    groups = [GroupSection(name=f"r{i}", tp=1, ep=1, heartbeat_interval_s=0.5) for i in range(2)]
    config = ClusterConfig(model=ModelSection(path=str(tiny_model_dir), name="kimi-k2-tiny"), groups=groups,
                           engine=ENGINE, controller=ControllerSection(health_interval_s=0.5, drain_timeout_s=30,
                                                                    restart_pause_s=2))
    controller = Controller(config, tiny_model_dir).start()
    try:
        outcomes, generations = asyncio.run(asyncio.wait_for(load_during_restart(controller), 600))
    finally:
        controller.stop()
    assert generations == {"r0": 2, "r1": 2}
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 20 and not failed, (len(outcomes), failed[:5])


async def load_during_restart(controller: Controller) -> tuple[list[str], dict[str, int]]:
    source = CallableDiscovery(lambda: [GroupInfo(e.name, e.address, e.healthy, e.generation)
                                        for e in controller.endpoints()])
    pool = GroupPool(source, Balancer(BalancerConfig(policy="least_load")),
                     config=GroupPoolConfig(poll_interval_s=0.2, probe_timeout_s=1.0)).start()
    outcomes: list[str] = []
    done = asyncio.Event()

    async def client(i: int) -> None:
        n = 0
        while not done.is_set():
            params = GenerateParams(f"c{i}-{n}", (5, 6, 7, i), max_tokens=12, temperature=0.0, ignore_eos=True)
            try:
                items = [item async for item in pool.generate(params)]
                outcomes.append("ok" if items[-1].completion_tokens == 12 else f"short {items[-1]}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                outcomes.append(f"{type(exc).__name__}: {exc}")
            n += 1

    try:
        await pool.wait_discovered()
        clients = [asyncio.create_task(client(i)) for i in range(4)]
        generations = await asyncio.to_thread(controller.rolling_restart)
        await asyncio.sleep(1.0)  # a moment of load on the restarted groups
        done.set()
        await asyncio.gather(*clients)
        return outcomes, generations
    finally:
        await pool.close()
