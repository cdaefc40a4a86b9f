"""The engine feeds WorkerMetrics (no Ray): step series, queue and KV cache gauges, prefix cache and
preemption counters, and exact tokens per expert of the MoE layers (single rank, tiny K2 checkpoint)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.loader import load_model
from k2serve.worker.metrics import EngineMetrics, EngineState, WorkerMetrics
from k2serve.worker.model.layers.moe_stats import MoEStatsSnapshot
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.request import SamplingParams
from k2serve.worker.scheduler import StepPlan
from k2serve.worker.vocab import Vocab

GROUP = "g-test"
GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32, progress=False)
    return model, Vocab.from_model_dir(tiny_model_dir, model.config.vocab_size)


def make_engine(tiny, moe_interval_s=0.0, num_blocks=64, **cfg):
    """An engine over the shared tiny model with fresh metrics (a new runner starts its MoE counts at zero)."""
    model, vocab = tiny
    config = EngineConfig(**{"max_model_len": 256, "block_size": 16, **cfg})
    metrics = WorkerMetrics(CollectorRegistry(), GROUP)
    engine = Engine(config, ModelRunner(model, num_blocks, config.block_size), vocab, metrics, moe_interval_s)
    return engine, metrics.registry


def value(registry, name, **labels) -> float:
    v = registry.get_sample_value(name, {"group": GROUP, **labels})
    return 0.0 if v is None else v


def expert_tokens(registry, layer) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == "k2serve_worker_expert_tokens_total" and s.labels["layer"] == str(layer))


def moe_layers(model) -> list[int]:
    return [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]


def prompts(n, seed=3, lo=5, hi=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(engine, batch: dict[str, list[int]], params=GREEDY) -> dict[str, dict]:
    """Run requests to completion; per request: generated token ids and cached prompt tokens."""
    for rid, p in batch.items():
        engine.add_request(rid, p, params)
    got = {rid: {"tokens": [], "cached": 0} for rid in batch}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id]["tokens"] += out.new_token_ids
            got[out.request_id]["cached"] = out.cached_tokens
    return got


def tokens_computed(batch, got) -> int:
    """Forward tokens: each prompt less its cache hit, plus every generated token but the last."""
    return sum(len(batch[r]) - got[r]["cached"] + len(got[r]["tokens"]) - 1 for r in batch)


def test_steps_queue_cache_and_exact_expert_tokens(tiny):
    model, _ = tiny
    engine, reg = make_engine(tiny, max_num_seqs=2)
    batch = {f"r{i}": p for i, p in enumerate(prompts(3))}
    for rid, p in batch.items():
        engine.add_request(rid, p, GREEDY)
    engine.step()
    assert value(reg, "k2serve_worker_running_requests") == 2
    assert value(reg, "k2serve_worker_waiting_requests") == 1
    assert 0 < value(reg, "k2serve_worker_kv_cache_usage_ratio") <= 1
    while engine.has_unfinished():
        engine.step()
    steps = value(reg, "k2serve_worker_step_duration_seconds_count")
    assert steps > 1 and value(reg, "k2serve_worker_step_duration_seconds_sum") > 0
    assert value(reg, "k2serve_worker_batch_size_tokens_count") == steps
    total = sum(len(p) for p in batch.values()) + 3 * (GREEDY.max_tokens - 1)  # no cache hits, no preemption
    assert value(reg, "k2serve_worker_batch_size_tokens_sum") == total
    assert value(reg, "k2serve_worker_prompt_tokens_total") == sum(len(p) for p in batch.values())
    assert value(reg, "k2serve_worker_generation_tokens_total") == 3 * GREEDY.max_tokens
    assert value(reg, "k2serve_worker_running_requests") == 0
    assert value(reg, "k2serve_worker_waiting_requests") == 0
    assert value(reg, "k2serve_worker_kv_cache_usage_ratio") == 0
    k = model.config.num_experts_per_tok
    layers = moe_layers(model)
    assert layers and 0 not in layers  # layer 0 is dense in K2 (first_k_dense_replace = 1)
    for layer in layers:
        assert expert_tokens(reg, layer) == total * k
        assert value(reg, "k2serve_worker_expert_load_imbalance_ratio", layer=str(layer)) >= 1
    assert expert_tokens(reg, 0) == 0
    assert sum(expert_tokens(reg, layer) for layer in layers) == total * k * len(layers)
    assert value(reg, "k2serve_worker_all_to_all_bytes_total", phase="dispatch") == 0  # one rank: no exchange


def test_prefix_cache_hit_rate_after_a_repeated_prompt(tiny):
    model, _ = tiny
    engine, reg = make_engine(tiny)
    prompt = prompts(1, seed=5, lo=40, hi=41)[0]  # 40 tokens: two full blocks of 16
    first = run(engine, {"a": prompt})
    second = run(engine, {"b": prompt})
    assert second["b"]["cached"] == 32 and first["a"]["cached"] == 0
    assert value(reg, "k2serve_worker_prefix_cache_queried_tokens_total") == 80
    assert value(reg, "k2serve_worker_prefix_cache_hit_tokens_total") == 32
    assert value(reg, "k2serve_worker_prefix_cache_hit_ratio") == pytest.approx(32 / 80)
    assert value(reg, "k2serve_worker_prompt_tokens_total") == 40 + 8  # hits are not computed
    total = tokens_computed({"a": prompt}, first) + tokens_computed({"b": prompt}, second)
    assert value(reg, "k2serve_worker_batch_size_tokens_sum") == total
    k = model.config.num_experts_per_tok
    assert all(expert_tokens(reg, layer) == total * k for layer in moe_layers(model))


def test_preemptions_are_counted(tiny):
    engine, reg = make_engine(tiny, num_blocks=10, block_size=4, max_num_batched_tokens=12)
    run(engine, {f"p{i}": p for i, p in enumerate(prompts(4, seed=7, lo=8, hi=16))},
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert value(reg, "k2serve_worker_preemptions_total") == engine.scheduler.num_preemptions
    assert value(reg, "k2serve_worker_kv_cache_usage_ratio") == 0


def test_moe_stats_are_collected_by_time_and_by_an_idle_step(tiny):
    """With a long interval only the first step collects; a step with nothing scheduled records the rest."""
    model, _ = tiny
    engine, reg = make_engine(tiny, moe_interval_s=3600.0)
    batch = {f"r{i}": p for i, p in enumerate(prompts(2, seed=11))}
    got = run(engine, batch)
    total = tokens_computed(batch, got)
    k, layer = model.config.num_experts_per_tok, moe_layers(model)[0]
    first_step = sum(len(p) for p in batch.values())  # both prompts fit the first step
    assert expert_tokens(reg, layer) == first_step * k
    assert engine.step() == []  # nothing scheduled: collects what the other steps left
    assert expert_tokens(reg, layer) == total * k
    steps = value(reg, "k2serve_worker_step_duration_seconds_count")
    engine.step()  # nothing pending: no forward, no change
    assert expert_tokens(reg, layer) == total * k
    assert value(reg, "k2serve_worker_step_duration_seconds_count") == steps  # idle steps are not steps


def layer_counts(runner) -> int:
    return sum(int(layer.expert_tokens.sum()) for layer in runner.moe_stats.layers)


def test_engine_without_metrics_never_collects(tiny):
    model, vocab = tiny
    runner = ModelRunner(model, 32, 16)
    engine = Engine(EngineConfig(max_model_len=256), runner, vocab)
    engine.generate([[1, 2, 3]], GREEDY)
    engine.step()
    assert layer_counts(runner) == (3 + 2) * model.config.num_experts_per_tok * len(moe_layers(model))


def test_empty_collecting_plan_runs_no_forward_and_drains(tiny):
    model, _ = tiny
    runner = ModelRunner(model, 8, 16)
    first = runner.moe_stats.layers[0]
    first.record_routing(torch.tensor([[1, 2], [2, 3]]))
    result = runner.execute(StepPlan(collect_moe_stats=True))
    assert result.logits is None
    assert result.moe_stats.expert_tokens[first.layer_idx][:4] == [0, 1, 2, 1]
    assert sorted(result.moe_stats.expert_tokens) == moe_layers(model)
    assert result.moe_stats.bytes_sent == {"dispatch": 0, "combine": 0} and result.moe_stats.durations == []
    assert layer_counts(runner) == 0  # drained
    assert runner.execute(StepPlan()).moe_stats is None  # a plan that does not ask collects nothing


def test_engine_metrics_deltas_and_interval():
    now = [100.0]
    m = WorkerMetrics(CollectorRegistry(), GROUP)
    rec = EngineMetrics(m, moe_interval_s=1.0, clock=lambda: now[0])
    assert rec.moe_stats_due(idle=False) and not rec.moe_stats_due(idle=True)  # the first step collects
    rec.collecting(idle=False)
    rec.step(0.01, 10, 10, 0, collected_moe=True)
    assert not rec.moe_stats_due(idle=False) and not rec.moe_stats_due(idle=True)
    rec.step(0.01, 1, 0, 1, collected_moe=False)
    assert rec.moe_stats_due(idle=True) and not rec.moe_stats_due(idle=False)
    rec.collecting(idle=True)  # gone idle: the rest is collected, and the next burst's first step is timed
    assert not rec.moe_stats_due(idle=True) and rec.moe_stats_due(idle=False)
    rec.collecting(idle=False)
    rec.step(0.01, 1, 0, 1, collected_moe=True)
    assert not rec.moe_stats_due(idle=False)
    now[0] += 1.0
    assert rec.moe_stats_due(idle=False)
    rec.state(EngineState(1, 2, 0.5, 0.25, 40, 10, 1))
    rec.state(EngineState(0, 0, 0.0, 0.2, 50, 10, 3))
    assert value(m.registry, "k2serve_worker_prefix_cache_queried_tokens_total") == 50
    assert value(m.registry, "k2serve_worker_prefix_cache_hit_tokens_total") == 10
    assert value(m.registry, "k2serve_worker_preemptions_total") == 3
    assert value(m.registry, "k2serve_worker_prefix_cache_hit_ratio") == 0.2
    rec.moe(MoEStatsSnapshot({1: [3, 1], 2: [0, 4]}, {"dispatch": 64, "combine": 32},
                             [("dispatch", 0.001), ("combine", 0.002), ("combine", 0.004)]))
    assert value(m.registry, "k2serve_worker_expert_tokens_total", layer="1", expert="0") == 3
    assert value(m.registry, "k2serve_worker_expert_tokens_total", layer="0", expert="0") == 0  # dense: none
    assert value(m.registry, "k2serve_worker_expert_load_imbalance_ratio", layer="2") == 2.0
    assert value(m.registry, "k2serve_worker_all_to_all_bytes_total", phase="combine") == 32
    assert value(m.registry, "k2serve_worker_all_to_all_duration_seconds_count", phase="combine") == 2
    assert value(m.registry, "k2serve_worker_all_to_all_duration_seconds_sum", phase="dispatch") == 0.001
    with pytest.raises(ValueError, match="moe_interval_s"):
        EngineMetrics(m, moe_interval_s=-1)


def test_async_engine_collects_moe_stats_when_idle(tiny):
    """Only the first step collects (long interval); going idle records the rest without a new request."""
    import asyncio
    import time

    from k2serve.worker.async_engine import AsyncEngine

    model, _ = tiny
    engine, reg = make_engine(tiny, moe_interval_s=3600.0)
    prompt = prompts(1, seed=13)[0]
    async_engine = AsyncEngine(engine, idle_wait_s=0.05)

    async def generate() -> list[int]:
        return [t async for out in async_engine.generate("x", prompt, GREEDY) for t in out.new_token_ids]

    try:
        tokens = asyncio.run(generate())
        total = len(prompt) + len(tokens) - 1
        layer, k = moe_layers(model)[0], model.config.num_experts_per_tok
        deadline = time.monotonic() + 5
        while expert_tokens(reg, layer) != total * k and time.monotonic() < deadline:
            time.sleep(0.02)
        assert expert_tokens(reg, layer) == total * k
    finally:
        async_engine.shutdown()


def test_rank_0s_http_port_serves_metrics_and_the_probes():
    import httpx
    from prometheus_client import CollectorRegistry

    from k2serve.worker.metrics import WorkerMetrics
    from k2serve.worker.metrics_server import serve_metrics

    registry, serving = CollectorRegistry(), [True]
    WorkerMetrics(registry, "g0").watch_health(lambda: serving[0])
    server = serve_metrics("127.0.0.1", 0, registry, lambda: serving[0])
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert httpx.get(url + "/ready").status_code == 200
        assert 'k2serve_worker_healthy{group="g0"} 1.0' in httpx.get(url + "/metrics").text
        serving[0] = False  # hung, failed or draining
        assert httpx.get(url + "/ready").status_code == 503 and httpx.get(url + "/health").status_code == 200
        assert 'k2serve_worker_healthy{group="g0"} 0.0' in httpx.get(url + "/metrics").text
    finally:
        server.shutdown()
        server.server_close()
