"""RouterMetrics and WorkerMetrics expose the documented series, and their methods move them."""

from __future__ import annotations

import enum

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from k2serve.router import metrics as router_metrics
from k2serve.router.metrics import RouterMetrics
from k2serve.worker import metrics as worker_metrics
from k2serve.worker.metrics import WorkerMetrics, load_imbalance

ALL_SPECS = router_metrics.METRICS + worker_metrics.METRICS


def scrape(metrics) -> dict[tuple[str, tuple], float]:
    """Parse the exposition text into {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def families(metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())}


def family_name(spec) -> str:
    return spec.name[: -len("_total")] if spec.kind == "counter" else spec.name


@pytest.fixture
def router():
    return RouterMetrics(CollectorRegistry(), model="kimi-k2")


@pytest.fixture
def worker():
    return WorkerMetrics(CollectorRegistry(), group="g0")


def test_specs_follow_naming_rules():
    names = [s.name for s in ALL_SPECS]
    assert len(names) == len(set(names))
    for spec in ALL_SPECS:
        assert spec.name.startswith("k2serve_"), spec.name
        assert spec.kind in ("counter", "gauge", "histogram"), spec
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert not any(u in spec.name for u in ("_ms", "milliseconds", "_kb", "_mb")), spec.name
        assert spec.help.strip(), spec.name
    for spec in worker_metrics.METRICS:
        assert spec.labels[0] == "group", spec.name


def test_router_exposes_every_documented_family(router):
    router.request_started("/v1/chat/completions")
    exposed = families(router)
    for spec in router_metrics.METRICS:
        assert exposed.get(family_name(spec)) == spec.kind, spec.name


def test_worker_exposes_every_documented_family(worker):
    worker.record_expert_load(1, [1, 2])
    worker.all_to_all_duration("dispatch", 0.001)
    worker.all_to_all_bytes("dispatch", 10)
    exposed = families(worker)
    for spec in worker_metrics.METRICS:
        assert exposed.get(family_name(spec)) == spec.kind, spec.name


def test_request_lifecycle_moves_counters_and_histograms(router):
    ep = "/v1/chat/completions"
    router.request_started(ep)
    assert scrape(router)[("k2serve_router_requests_in_flight", (("endpoint", ep),))] == 1
    router.queue_time(0.003)
    router.observe_ttft(0.2)
    for _ in range(3):
        router.observe_itl(0.02)
    router.tokens(prompt=10, generated=4, cached=6)
    router.request_finished(ep, 200, 1.5)
    s = scrape(router)
    model = ("model", "kimi-k2")
    assert s[("k2serve_router_requests_in_flight", (("endpoint", ep),))] == 0
    assert s[("k2serve_router_requests_total", (("endpoint", ep), model, ("status", "200")))] == 1
    assert s[("k2serve_router_request_duration_seconds_sum", (("endpoint", ep), model))] == 1.5
    assert s[("k2serve_router_time_to_first_token_seconds_count", (model,))] == 1
    assert s[("k2serve_router_time_to_first_token_seconds_bucket", (("le", "0.25"), model))] == 1
    assert s[("k2serve_router_time_to_first_token_seconds_bucket", (("le", "0.1"), model))] == 0
    assert s[("k2serve_router_inter_token_latency_seconds_count", (model,))] == 3
    assert s[("k2serve_router_queue_time_seconds_count", (model,))] == 1
    assert s[("k2serve_router_prompt_tokens_total", (model,))] == 10
    assert s[("k2serve_router_generation_tokens_total", (model,))] == 4
    assert s[("k2serve_router_cached_prompt_tokens_total", (model,))] == 6


def test_histogram_buckets_span_llm_latencies():
    assert router_metrics.TTFT_BUCKETS[0] == 0.005 and router_metrics.TTFT_BUCKETS[-1] == 60
    assert router_metrics.ITL_BUCKETS[0] == 0.001 and router_metrics.ITL_BUCKETS[-1] == 5
    assert router_metrics.E2E_BUCKETS[0] == 0.05 and router_metrics.E2E_BUCKETS[-1] == 600
    for spec in ALL_SPECS:
        if spec.buckets:
            assert list(spec.buckets) == sorted(set(spec.buckets)), spec.name


def test_retry_disconnect_dispatch(router):
    router.retry("g0")
    router.retry("g0")
    router.client_disconnect("/v1/messages")
    router.dispatched("g1")
    s = scrape(router)
    assert s[("k2serve_router_retries_total", (("group", "g0"),))] == 2
    assert s[("k2serve_router_client_disconnects_total", (("endpoint", "/v1/messages"),))] == 1
    assert s[("k2serve_router_group_dispatches_total", (("group", "g1"),))] == 1


def test_group_health_counts_healthy_groups(router):
    assert scrape(router)[("k2serve_router_healthy_groups", ())] == 0
    router.set_group_health("g0", True)
    router.set_group_health("g1", True)
    router.set_group_health("g1", False)
    s = scrape(router)
    assert s[("k2serve_router_healthy_groups", ())] == 1
    assert s[("k2serve_router_group_healthy", (("group", "g1"),))] == 0
    router.remove_group("g0")
    s = scrape(router)
    assert s[("k2serve_router_healthy_groups", ())] == 0
    assert ("k2serve_router_group_healthy", (("group", "g0"),)) not in s


def test_counters_survive_a_group_replacement_and_stay_bounded():
    router = RouterMetrics(CollectorRegistry(), model="k2", max_retired_groups=2)
    router.set_group_health("g0", True)
    router.dispatched("g0")
    router.retry("g0")
    router.migration("g0")
    router.remove_group("g0")  # the controller replaces g0: a scrape after the failover still sees them
    s = scrape(router)
    for name in ("k2serve_router_group_dispatches_total", "k2serve_router_retries_total",
                 "k2serve_router_migrations_total"):
        assert s[(name, (("group", "g0"),))] == 1, name
    assert ("k2serve_router_group_healthy", (("group", "g0"),)) not in s
    router.set_group_health("g0", True)  # the new g0 counts on
    router.retry("g0")
    for name in ("a", "b", "c"):  # groups that leave for good: only the newest two keep their series
        router.set_group_health(name, True)
        router.retry(name)
        router.remove_group(name)
    s = scrape(router)
    assert s[("k2serve_router_retries_total", (("group", "g0"),))] == 2
    assert {g for (n, labels) in s if n == "k2serve_router_retries_total" for _, g in labels} == {"g0", "b", "c"}


def test_cancellations_and_draining(router):
    router.cancelled("slow_client")
    router.cancelled("deadline")
    router.cancelled("deadline")
    assert scrape(router)[("k2serve_router_draining", ())] == 0
    router.draining(True)
    s = scrape(router)
    assert s[("k2serve_router_requests_cancelled_total", (("reason", "deadline"),))] == 2
    assert s[("k2serve_router_requests_cancelled_total", (("reason", "slow_client"),))] == 1
    assert s[("k2serve_router_draining", ())] == 1


def test_circuit_state(router):
    router.set_circuit_state("g0", "open")
    assert scrape(router)[("k2serve_router_circuit_state", (("group", "g0"),))] == 2
    router.set_circuit_state("g0", "half_open")
    assert scrape(router)[("k2serve_router_circuit_state", (("group", "g0"),))] == 1
    router.set_circuit_state("g0", "half-open")
    assert scrape(router)[("k2serve_router_circuit_state", (("group", "g0"),))] == 1

    class State(enum.Enum):
        CLOSED = "closed"

    router.set_circuit_state("g0", State.CLOSED)
    assert scrape(router)[("k2serve_router_circuit_state", (("group", "g0"),))] == 0
    with pytest.raises(ValueError, match="unknown circuit state"):
        router.set_circuit_state("g0", "ajar")


def test_two_instances_do_not_share_state():
    a, b = RouterMetrics(CollectorRegistry()), RouterMetrics(CollectorRegistry())
    a.retry("g0")
    assert ("k2serve_router_retries_total", (("group", "g0"),)) not in scrape(b)


def test_worker_scheduler_and_cache_series(worker):
    g = (("group", "g0"),)
    worker.set_queue(running=3, waiting=5)
    worker.set_kv_cache_usage(0.75)
    worker.set_prefix_cache_hit_rate(0.4)
    worker.prefix_cache_lookup(queried_tokens=100, hit_tokens=40)
    worker.preempted()
    worker.preempted(2)
    s = scrape(worker)
    assert s[("k2serve_worker_running_requests", g)] == 3
    assert s[("k2serve_worker_waiting_requests", g)] == 5
    assert s[("k2serve_worker_kv_cache_usage_ratio", g)] == 0.75
    assert s[("k2serve_worker_prefix_cache_hit_ratio", g)] == 0.4
    assert s[("k2serve_worker_prefix_cache_queried_tokens_total", g)] == 100
    assert s[("k2serve_worker_prefix_cache_hit_tokens_total", g)] == 40
    assert s[("k2serve_worker_preemptions_total", g)] == 3
    with pytest.raises(ValueError, match="hit_tokens"):
        worker.prefix_cache_lookup(queried_tokens=1, hit_tokens=2)


def test_worker_step_series(worker):
    g = (("group", "g0"),)
    worker.step(0.012, num_tokens=300, prompt_tokens=290, generated_tokens=10)
    s = scrape(worker)
    assert s[("k2serve_worker_step_duration_seconds_count", g)] == 1
    assert s[("k2serve_worker_step_duration_seconds_sum", g)] == pytest.approx(0.012)
    assert s[("k2serve_worker_batch_size_tokens_bucket", (("group", "g0"), ("le", "256.0")))] == 0
    assert s[("k2serve_worker_batch_size_tokens_bucket", (("group", "g0"), ("le", "512.0")))] == 1
    assert s[("k2serve_worker_prompt_tokens_total", g)] == 290
    assert s[("k2serve_worker_generation_tokens_total", g)] == 10


def test_expert_load_counts_and_imbalance(worker):
    worker.record_expert_load(3, [4, 0, 2, 2])
    worker.record_expert_load(3, [1, 0, 0, 0])
    s = scrape(worker)

    def expert(e):
        return s.get(("k2serve_worker_expert_tokens_total",
                      (("expert", str(e)), ("group", "g0"), ("layer", "3"))))

    assert [expert(e) for e in range(4)] == [5, 0, 2, 2]  # every expert has a series
    # The gauge reflects the latest window: [1, 0, 0, 0] -> max 1 / mean 0.25 = 4.
    assert s[("k2serve_worker_expert_load_imbalance_ratio", (("group", "g0"), ("layer", "3")))] == 4
    with pytest.raises(ValueError, match="negative"):
        worker.record_expert_load(3, [1, -1, 0, 0])


def test_expert_load_accepts_tensors(worker):
    torch = pytest.importorskip("torch")
    worker.record_expert_load(1, torch.tensor([3, 3]))
    s = scrape(worker)
    assert s[("k2serve_worker_expert_load_imbalance_ratio", (("group", "g0"), ("layer", "1")))] == 1


def test_load_imbalance():
    assert load_imbalance([]) == 1.0
    assert load_imbalance([0, 0]) == 1.0
    assert load_imbalance([2, 2, 2]) == 1.0
    assert load_imbalance([6, 0, 0]) == 3.0


def test_all_to_all(worker):
    worker.all_to_all_duration("dispatch", 0.0004)
    worker.all_to_all_bytes("combine", 1 << 20)
    worker.all_to_all_bytes("combine", 1 << 20)
    s = scrape(worker)
    assert s[("k2serve_worker_all_to_all_bytes_total", (("group", "g0"), ("phase", "combine")))] == 2 << 20
    assert s[("k2serve_worker_all_to_all_duration_seconds_count",
              (("group", "g0"), ("phase", "dispatch")))] == 1
    with pytest.raises(ValueError, match="phase"):
        worker.all_to_all_duration("scatter", 0.1)
    with pytest.raises(ValueError, match="phase"):
        worker.all_to_all_bytes("scatter", 1)


def test_render_returns_body_and_content_type(router, worker):
    for metrics in (router, worker):
        body, content_type = metrics.render()
        assert body.startswith(b"# HELP") and content_type.startswith("text/plain")
