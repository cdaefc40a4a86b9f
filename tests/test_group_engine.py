"""The engine through a TP=EP=2 worker group (real Ray, gloo, gRPC) vs the engine in one process."""

from __future__ import annotations

import asyncio
import time

import pytest

from k2serve.cluster.config import GroupSection
from k2serve.cluster.group import WorkerGroup
from k2serve.cluster.rank_actor import ServeSpec
from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.loader import load_model
from k2serve.worker.request import SamplingParams

ENGINE = EngineConfig(num_kv_blocks=96, block_size=16, max_num_seqs=4, max_num_batched_tokens=64)
PROMPTS = [[5, 77, 300, 12, 900, 1000, 4], [1, 2, 3], list(range(100, 150)), [640, 11], [7] * 21, [33, 44, 55, 66, 77]]
LENGTHS = [12, 30, 5, 20, 9, 16]


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in LENGTHS]


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir):
    g = WorkerGroup(GroupSection(name="engine-test", tp=2, ep=2, collective_timeout_s=3.0), str(tiny_model_dir),
                    ENGINE).start()
    yield g
    g.stop()


def test_group_engine_matches_single_process(group, tiny_model_dir):
    """Six requests through max_num_seqs=4: requests join as others leave, chunked prefill included."""
    import ray

    want = Engine.from_model_dir(tiny_model_dir, ENGINE).generate(PROMPTS, params())
    got = ray.get(group.driver.generate.remote(PROMPTS, params()))
    assert got == want
    assert [len(g) for g in got] == LENGTHS


def test_an_idle_group_outlives_the_collective_timeout(group):
    """Followers wait for plans on the control group, which has no short timeout: idling is not a fault."""
    import ray

    time.sleep(4.5)  # longer than collective_timeout_s=3
    assert group.is_healthy()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(ray.get(group.driver.generate.remote([PROMPTS[0]], [params]))[0]) == 4


def test_each_rank_holds_only_its_shard(group, tiny_model_dir):
    import ray

    full = load_model(tiny_model_dir, progress=False)
    expected = [0, 0]
    for name, p in full.named_parameters():
        if ".mlp.experts." in name:
            expert = int(name.split(".mlp.experts.")[1].split(".")[0])
            expected[expert // 8] += p.numel()
        elif name.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight", "embed_tokens.weight", "lm_head.weight")) \
                or (".mlp." in name and ".layers.0." in name):
            expected = [e + p.numel() // 2 for e in expected]
        else:
            expected = [e + p.numel() for e in expected]
    counts = ray.get([a.num_parameters.remote() for a in group.actors])
    assert counts == expected
    assert sum(counts) < 2 * sum(p.numel() for p in full.parameters())


def test_killing_a_rank_fails_in_flight_requests_and_marks_the_group_unhealthy(group):
    import ray

    from k2serve.router.pool.worker import Finished, GenerateParams, WorkerError
    from k2serve.router.pool.worker_client import WorkerClient

    address = group.serve(ServeSpec("127.0.0.1", 0))
    assert group.is_healthy()

    async def stream() -> tuple[str, float]:
        client = WorkerClient(address)
        params = GenerateParams(request_id="victim", prompt_token_ids=(5, 6, 7), max_tokens=1400, temperature=0.0,
                                ignore_eos=True)
        killed_at = None
        try:
            async for item in client.generate(params):
                if killed_at is None:
                    ray.kill(group.actors[1], no_restart=True)
                    killed_at = time.monotonic()
                if isinstance(item, Finished):
                    return item.finish_reason, time.monotonic() - killed_at
        except WorkerError as e:
            assert killed_at is not None, f"failed before any token: {e}"
            return f"error: {e}", time.monotonic() - killed_at
        return "ended", time.monotonic() - killed_at

    outcome, seconds = asyncio.run(asyncio.wait_for(stream(), timeout=90))
    assert outcome.startswith("error") or outcome == "error", outcome
    assert seconds < 60
    deadline = time.monotonic() + 10
    while group.is_healthy() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group.is_healthy()
