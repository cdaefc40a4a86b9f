"""WorkerMetrics: a worker group's Prometheus series (prefix ``k2serve_worker_``, base units).

Every series carries the ``group`` label. The series are declared once, as data, in ``METRICS``;
``WorkerMetrics`` builds them into a caller-owned ``CollectorRegistry`` (no global registry) and
offers one small method per event the engine, scheduler and MoE dispatcher record.

Expert load: ``record_expert_load(layer, tokens_per_expert)`` adds to a counter per (layer, expert)
and sets the layer's imbalance gauge (max over mean). K2 has 60 MoE layers x 384 experts, so the
per-expert counter is up to 23,040 series per group: call it with counts summed over many steps
(e.g. once a second), not on every step.

``EngineMetrics`` is what rank 0's Engine feeds: it turns the scheduler's and KV cache manager's
cumulative counters into counter increments, decides when the group collects its MoE statistics
(every ``moe_interval_s``, and on an idle step when steps ran since the last collection), and records
a collected ``MoEStatsSnapshot`` (worker/model/layers/moe_stats.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

if TYPE_CHECKING:
    from k2serve.worker.model.layers.moe_stats import MoEStatsSnapshot

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
ALL_TO_ALL_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# The two all-to-all exchanges of an expert-parallel MoE layer (docs/architecture.md).
ALL_TO_ALL_PHASES = ("dispatch", "combine")


@dataclass(frozen=True)
class MetricSpec:
    """One exposed series family: name as scraped (counters end in _total), type, labels, help."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("k2serve_worker_healthy", "gauge", ("group",),
               "1 while the group can generate (its steps and idle heartbeats pass every rank in time and "
               "it is not draining), else 0."),
    MetricSpec("k2serve_worker_running_requests", "gauge", ("group",),
               "Requests in the running batch."),
    MetricSpec("k2serve_worker_waiting_requests", "gauge", ("group",),
               "Requests waiting to be scheduled."),
    MetricSpec("k2serve_worker_kv_cache_usage_ratio", "gauge", ("group",),
               "Fraction of KV cache blocks in use (0..1)."),
    MetricSpec("k2serve_worker_prefix_cache_hit_ratio", "gauge", ("group",),
               "Prefix cache hit rate as reported by the KV cache manager (0..1)."),
    MetricSpec("k2serve_worker_prefix_cache_queried_tokens_total", "counter", ("group",),
               "Prompt tokens looked up in the prefix cache."),
    MetricSpec("k2serve_worker_prefix_cache_hit_tokens_total", "counter", ("group",),
               "Prompt tokens found in the prefix cache."),
    MetricSpec("k2serve_worker_preemptions_total", "counter", ("group",),
               "Running requests preempted to free KV cache blocks."),
    MetricSpec("k2serve_worker_prompt_tokens_total", "counter", ("group",),
               "Prompt tokens computed (prefill), excluding prefix-cache hits."),
    MetricSpec("k2serve_worker_generation_tokens_total", "counter", ("group",),
               "Tokens sampled (decode)."),
    MetricSpec("k2serve_worker_step_duration_seconds", "histogram", ("group",),
               "Wall time of one engine step (schedule, execute, postprocess).", STEP_BUCKETS),
    MetricSpec("k2serve_worker_batch_size_tokens", "histogram", ("group",),
               "Tokens computed in one engine step.", BATCH_TOKEN_BUCKETS),
    MetricSpec("k2serve_worker_expert_tokens_total", "counter", ("group", "layer", "expert"),
               "Tokens routed to each expert of each MoE layer."),
    MetricSpec("k2serve_worker_expert_load_imbalance_ratio", "gauge", ("group", "layer"),
               "Max over mean of tokens per expert in the last recorded window (1 = balanced)."),
    MetricSpec("k2serve_worker_all_to_all_duration_seconds", "histogram", ("group", "phase"),
               "Time of one MoE all-to-all exchange (phase dispatch or combine) on rank 0, sampled on the step "
               "that collects MoE statistics: CUDA events around the collective on GPU, wall time on gloo.",
               ALL_TO_ALL_BUCKETS),
    MetricSpec("k2serve_worker_all_to_all_bytes_total", "counter", ("group", "phase"),
               "Bytes the group's ranks sent to other ranks in MoE all-to-all exchanges."),
)

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def build_metrics(registry: CollectorRegistry, specs: tuple[MetricSpec, ...]) -> dict:
    """Create one prometheus_client object per spec in ``registry``; returns them by name."""
    built = {}
    for spec in specs:
        kwargs = {"labelnames": spec.labels, "registry": registry}
        if spec.buckets is not None:
            kwargs["buckets"] = spec.buckets
        built[spec.name] = _KINDS[spec.kind](spec.name, spec.help, **kwargs)
    return built


def load_imbalance(tokens_per_expert: list[int]) -> float:
    """Max over mean of per-expert token counts; 1.0 when perfectly balanced or empty."""
    total = sum(tokens_per_expert)
    if not tokens_per_expert or total == 0:
        return 1.0
    return max(tokens_per_expert) * len(tokens_per_expert) / total


def _checked_phase(phase: str) -> str:
    if phase not in ALL_TO_ALL_PHASES:
        raise ValueError(f"unknown all-to-all phase {phase!r}; expected one of {ALL_TO_ALL_PHASES}")
    return phase


class WorkerMetrics:
    """The metrics of worker group ``group``, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, group: str):
        self.registry = registry
        self.group = group
        self._m = build_metrics(registry, METRICS)
        # Children bound to our group label, for the group-only series (the hot path).
        self._g = {s.name: self._m[s.name].labels(group=group) for s in METRICS if s.labels == ("group",)}
        self._expert_children: dict[int, list] = {}

    # ---- health ------------------------------------------------------------------------------
    def watch_health(self, is_serving: Callable[[], bool]) -> None:
        """Read the health gauge from `is_serving()` at each scrape (it stays right while the engine
        thread hangs, when nothing else would update it)."""
        self._g["k2serve_worker_healthy"].set_function(lambda: 1.0 if is_serving() else 0.0)

    # ---- scheduler and KV cache ------------------------------------------------------------
    def set_queue(self, running: int, waiting: int) -> None:
        """Current running and waiting request counts."""
        self._g["k2serve_worker_running_requests"].set(running)
        self._g["k2serve_worker_waiting_requests"].set(waiting)

    def set_kv_cache_usage(self, fraction: float) -> None:
        """Fraction (0..1) of KV cache blocks in use."""
        self._g["k2serve_worker_kv_cache_usage_ratio"].set(fraction)

    def set_prefix_cache_hit_rate(self, fraction: float) -> None:
        """Hit rate (0..1) as the KV cache manager reports it."""
        self._g["k2serve_worker_prefix_cache_hit_ratio"].set(fraction)

    def prefix_cache_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """One prefix-cache lookup: ``hit_tokens`` of ``queried_tokens`` prompt tokens were cached."""
        if hit_tokens > queried_tokens:
            raise ValueError(f"hit_tokens {hit_tokens} > queried_tokens {queried_tokens}")
        self._g["k2serve_worker_prefix_cache_queried_tokens_total"].inc(queried_tokens)
        self._g["k2serve_worker_prefix_cache_hit_tokens_total"].inc(hit_tokens)

    def preempted(self, count: int = 1) -> None:
        """``count`` running requests were preempted."""
        self._g["k2serve_worker_preemptions_total"].inc(count)

    # ---- engine step -----------------------------------------------------------------------
    def step(self, seconds: float, num_tokens: int, prompt_tokens: int = 0,
             generated_tokens: int = 0) -> None:
        """One engine step: its wall time, tokens computed, and prefill/decode token split."""
        self._g["k2serve_worker_step_duration_seconds"].observe(seconds)
        self._g["k2serve_worker_batch_size_tokens"].observe(num_tokens)
        if prompt_tokens:
            self._g["k2serve_worker_prompt_tokens_total"].inc(prompt_tokens)
        if generated_tokens:
            self._g["k2serve_worker_generation_tokens_total"].inc(generated_tokens)

    # ---- MoE ---------------------------------------------------------------------------------
    def record_expert_load(self, layer: int, tokens_per_expert: Iterable[int]) -> None:
        """Add per-expert token counts of MoE ``layer``."""
        counts = [int(c) for c in tokens_per_expert]
        if any(c < 0 for c in counts):
            raise ValueError(f"negative token count for layer {layer}: {counts}")
        children = self._experts(layer, len(counts))
        for child, count in zip(children, counts):
            if count:
                child.inc(count)
        self._m["k2serve_worker_expert_load_imbalance_ratio"].labels(
            group=self.group, layer=str(layer)).set(load_imbalance(counts))

    def _experts(self, layer: int, num_experts: int) -> list:
        children = self._expert_children.get(layer)
        if children is None or len(children) != num_experts:
            family = self._m["k2serve_worker_expert_tokens_total"]
            children = [family.labels(group=self.group, layer=str(layer), expert=str(e))
                        for e in range(num_experts)]
            self._expert_children[layer] = children
        return children

    def all_to_all_duration(self, phase: str, seconds: float) -> None:
        """The time of one all-to-all exchange (``phase`` dispatch or combine)."""
        self._m["k2serve_worker_all_to_all_duration_seconds"].labels(
            group=self.group, phase=_checked_phase(phase)).observe(seconds)

    def all_to_all_bytes(self, phase: str, num_bytes: int) -> None:
        """Bytes sent to other ranks in ``phase`` exchanges."""
        self._m["k2serve_worker_all_to_all_bytes_total"].labels(
            group=self.group, phase=_checked_phase(phase)).inc(num_bytes)

    # ---- exposition ------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition of this registry and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class EngineState:
    """A snapshot of the engine's scheduler and KV cache (the cumulative counters as they stand)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    prefix_cache_queried_tokens: int  # cumulative
    prefix_cache_hit_tokens: int  # cumulative
    num_preemptions: int  # cumulative


class EngineMetrics:
    """Rank 0's engine-side recorder over a WorkerMetrics.

    ``step`` records one executed step; ``state`` sets the gauges and adds what the cumulative counters
    gained since the last call; ``moe_stats_due`` says whether this step should collect the group's
    MoE statistics, ``collecting`` that it does, and ``moe`` records what it collected.
    """

    def __init__(self, metrics: WorkerMetrics, moe_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if moe_interval_s < 0:
            raise ValueError(f"moe_interval_s must be >= 0, got {moe_interval_s}")
        self.metrics = metrics
        self.moe_interval_s = moe_interval_s
        self._clock = clock
        self._last_moe = -math.inf
        self._steps_since_moe = 0  # steps whose MoE stats are still on the ranks
        self._after_idle = False  # the last collection was an idle one: the next working step collects
        self._seen = EngineState(0, 0, 0.0, 0.0, 0, 0, 0)

    def moe_stats_due(self, idle: bool) -> bool:
        """Whether the coming step collects the group's MoE statistics: a working step once
        ``moe_interval_s`` passed since the last collection (the first step at once) or when it is the
        first after an idle collection (so every burst has a timed step, however short); an ``idle`` one
        (nothing scheduled) when steps ran since the last collection."""
        if idle:
            return self._steps_since_moe > 0
        return self._after_idle or self._clock() - self._last_moe >= self.moe_interval_s

    def collecting(self, idle: bool) -> None:
        """The coming step (``idle``: with nothing scheduled) collects: the steps so far are accounted for."""
        self._steps_since_moe, self._last_moe, self._after_idle = 0, self._clock(), idle

    def step(self, seconds: float, num_tokens: int, prompt_tokens: int, generated_tokens: int,
             collected_moe: bool) -> None:
        """One executed step; ``collected_moe`` if it collected the MoE statistics (its own included)."""
        self.metrics.step(seconds, num_tokens, prompt_tokens, generated_tokens)
        if not collected_moe:
            self._steps_since_moe += 1

    def state(self, now: EngineState) -> None:
        """Set the queue and cache gauges; add the growth of the cumulative counters."""
        m, seen = self.metrics, self._seen
        m.set_queue(now.num_running, now.num_waiting)
        m.set_kv_cache_usage(now.kv_cache_usage)
        m.set_prefix_cache_hit_rate(now.prefix_cache_hit_rate)
        queried = now.prefix_cache_queried_tokens - seen.prefix_cache_queried_tokens
        hit = now.prefix_cache_hit_tokens - seen.prefix_cache_hit_tokens
        if queried or hit:
            m.prefix_cache_lookup(queried, hit)
        if now.num_preemptions > seen.num_preemptions:
            m.preempted(now.num_preemptions - seen.num_preemptions)
        self._seen = now

    def moe(self, snapshot: MoEStatsSnapshot) -> None:
        """Record collected MoE statistics: group-summed tokens per expert of each MoE layer and bytes
        per phase, and the exchange times of rank 0's timed step."""
        for layer, counts in snapshot.expert_tokens.items():
            self.metrics.record_expert_load(layer, counts)
        for phase, num_bytes in snapshot.bytes_sent.items():
            if num_bytes:
                self.metrics.all_to_all_bytes(phase, num_bytes)
        for phase, seconds in snapshot.durations:
            self.metrics.all_to_all_duration(phase, seconds)
