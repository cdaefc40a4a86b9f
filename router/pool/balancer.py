"""Balancer: choose a worker group for each request (load, prefix affinity, health).

Each group is a `Backend`: this router's in-flight count, the group's last load report, an external
health flag (gRPC health / controller) and a `CircuitBreaker` that ejects the group after consecutive
failures and re-admits it after a cool-down probe succeeds. A policy from `POLICIES` picks among the
groups that can take a request:

* `round_robin`: cycle through the groups in name order.
* `least_load`: lowest load score (in-flight requests plus the reported running/waiting/KV load).
* `cache_aware`: send requests sharing a prompt prefix to the group that served it (its prefix cache
  holds the KV), unless that group is busier than the least loaded one by the configured thresholds.

Admission (the router's concurrency limit and bounded queue) lives in admission.py.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from k2serve.router.pool.worker import Worker

Clock = Callable[[], float]


class BalancerConfig(BaseModel):
    """How the router spreads requests over worker groups."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str = Field("cache_aware", description="round_robin | least_load | cache_aware")
    prefix_block_tokens: int = Field(64, ge=1, description="cache_aware: prompt tokens per hashed prefix block")
    max_prefix_blocks: int = Field(256, ge=1, description="cache_aware: leading blocks hashed per prompt")
    prefix_table_blocks: int = Field(65536, ge=1, description="cache_aware: block hashes remembered per group (LRU)")
    balance_abs_threshold: float = Field(8.0, description="cache_aware: spill to the least loaded group when the "
                                         "affine group's load exceeds it by more than this ...")
    balance_rel_threshold: float = Field(1.5, description="... and by more than this factor")
    report_weight: float = Field(1.0, description="load score weight of reported running + waiting requests")
    kv_usage_weight: float = Field(8.0, description="load score weight of reported KV-cache usage (0..1)")
    load_report_ttl_s: float = Field(10.0, description="load reports older than this are ignored")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that eject a group (breaker opens)")
    cooldown_s: float = Field(10.0, description="seconds an ejected group waits before a probe request")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}; expected one of {sorted(POLICIES)}")
        return policy


class BreakerState(enum.Enum):
    """Circuit breaker states (values match RouterMetrics.set_circuit_state)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> half-open after `cooldown_s`,
    when one probe request may pass -> closed on its success, open again on its failure."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Clock) -> None:
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self.consecutive_failures = 0
        self._opened_at: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._cooldown_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def can_accept(self) -> bool:
        """Closed: yes. Open: no. Half-open: one probe at a time (a probe lost for a cool-down is retried)."""
        state = self.state
        if state is not BreakerState.HALF_OPEN:
            return state is BreakerState.CLOSED
        return self._probe_since is None or self._clock() - self._probe_since >= self._cooldown_s

    def on_start(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._probe_since = self._clock()

    def record_success(self) -> None:
        if self.state is BreakerState.OPEN:
            return  # a request that started before the breaker opened proves nothing
        self.consecutive_failures = 0
        self._opened_at = self._probe_since = None

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
                state is BreakerState.CLOSED and self.consecutive_failures >= self._threshold):
            self._opened_at = self._clock()
            self._probe_since = None


class LoadLike(Protocol):
    """A group's load report (WorkerLoad has these fields)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class BackendSpec:
    """A worker group as discovery reports it."""

    name: str
    address: str = ""
    client: Worker | None = None  # carried along for the caller (GroupPool)


@dataclass
class Backend:
    """The balancer's view of one worker group."""

    name: str
    address: str
    breaker: CircuitBreaker
    client: Worker | None = None
    in_flight: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    load_reported_at: float | None = None
    healthy: bool = True  # external health (gRPC health checks, controller)

    def can_accept(self) -> bool:
        return self.healthy and self.breaker.can_accept()


def prefix_block_hashes(prompt_ids: Sequence[int], block_tokens: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's leading full blocks: hash k identifies the whole prefix to block k."""
    hashes: list[int] = []
    prev = 0
    for start in range(0, min(len(prompt_ids) // block_tokens, max_blocks) * block_tokens, block_tokens):
        prev = hash((prev, tuple(prompt_ids[start:start + block_tokens])))
        hashes.append(prev)
    return hashes


class PrefixTable:
    """LRU set of prefix-block hashes one group has served (an approximation of its prefix cache)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of `hashes` this group has seen."""
        for k, h in enumerate(hashes):
            if h not in self._entries:
                return k
        return len(hashes)

    def insert(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._entries[h] = None
            self._entries.move_to_end(h)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


class Policy:
    """A balancing policy: choose one of `candidates` (non-empty, in name order) for a prompt."""

    def __init__(self, config: BalancerConfig, score: Callable[[Backend], float]) -> None:
        self.config = config
        self.score = score

    def choose(self, candidates: list[Backend], prompt_ids: Sequence[int]) -> Backend:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Forget a group that discovery removed."""

    def least_loaded(self, candidates: list[Backend]) -> Backend:
        return min(candidates, key=self.score)


class RoundRobinPolicy(Policy):
    """Cycle through the groups in name order; stable when groups come and go."""

    def __init__(self, config: BalancerConfig, score: Callable[[Backend], float]) -> None:
        super().__init__(config, score)
        self._last: str | None = None

    def choose(self, candidates: list[Backend], prompt_ids: Sequence[int]) -> Backend:
        later = [b for b in candidates if self._last is None or b.name > self._last]
        chosen = (later or candidates)[0]
        self._last = chosen.name
        return chosen


class LeastLoadPolicy(Policy):
    """The group with the lowest load score (ties: name order)."""

    def choose(self, candidates: list[Backend], prompt_ids: Sequence[int]) -> Backend:
        return self.least_loaded(candidates)


class CacheAwarePolicy(Policy):
    """Prefix affinity: the group that served the longest prefix of this prompt, unless unbalanced."""

    def __init__(self, config: BalancerConfig, score: Callable[[Backend], float]) -> None:
        super().__init__(config, score)
        self._tables: dict[str, PrefixTable] = {}

    def choose(self, candidates: list[Backend], prompt_ids: Sequence[int]) -> Backend:
        cfg = self.config
        hashes = prefix_block_hashes(prompt_ids, cfg.prefix_block_tokens, cfg.max_prefix_blocks)
        least = self.least_loaded(candidates)
        affine = max(candidates, key=lambda b: (self.table(b.name).match(hashes), -self.score(b)))
        matched = self.table(affine.name).match(hashes) > 0
        chosen = affine if matched and not self.is_unbalanced(affine, least) else least
        self.table(chosen.name).insert(hashes)
        return chosen

    def is_unbalanced(self, affine: Backend, least: Backend) -> bool:
        a, m = self.score(affine), self.score(least)
        return a - m > self.config.balance_abs_threshold and a > m * self.config.balance_rel_threshold

    def table(self, name: str) -> PrefixTable:
        if name not in self._tables:
            self._tables[name] = PrefixTable(self.config.prefix_table_blocks)
        return self._tables[name]

    def remove(self, name: str) -> None:
        self._tables.pop(name, None)


POLICIES: Mapping[str, type[Policy]] = MappingProxyType({
    "round_robin": RoundRobinPolicy,
    "least_load": LeastLoadPolicy,
    "cache_aware": CacheAwarePolicy,
})


class Balancer:
    """Chooses a worker group per request and tracks each group's load and health.

    Call `pick`, then `on_start` when the request is sent and `on_finish(ok)` when it ends
    (ok=False only for failures of the group: transport errors, 5xx, not client errors).
    """

    def __init__(self, config: BalancerConfig = BalancerConfig(), clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._policy = POLICIES[config.policy](config, self.load_score)

    @property
    def backends(self) -> list[Backend]:
        """Every known group, in name order."""
        return [self._backends[n] for n in sorted(self._backends)]

    def get(self, name: str) -> Backend | None:
        return self._backends.get(name)

    def set_backends(self, specs: Iterable[BackendSpec | str]) -> None:
        """Replace the set of groups (discovery); groups that stay keep their load and health state."""
        specs = [BackendSpec(s) if isinstance(s, str) else s for s in specs]
        wanted = {s.name: s for s in specs}
        for name in list(self._backends):
            if name not in wanted:
                del self._backends[name]
                self._policy.remove(name)
        for name, spec in wanted.items():
            if name in self._backends:
                self._backends[name].address, self._backends[name].client = spec.address, spec.client
            else:
                breaker = CircuitBreaker(self.config.failure_threshold, self.config.cooldown_s, self._clock)
                self._backends[name] = Backend(name, spec.address, breaker, spec.client)

    def pick(self, prompt_ids: Sequence[int], exclude: Iterable[str | Backend] = ()) -> Backend | None:
        """The group for a request with these prompt token ids; None when no group can take it."""
        excluded = {e.name if isinstance(e, Backend) else e for e in exclude}
        candidates = [b for b in self.backends if b.name not in excluded and b.can_accept()]
        return self._policy.choose(candidates, prompt_ids) if candidates else None

    def on_start(self, backend: Backend) -> None:
        backend.in_flight += 1
        backend.breaker.on_start()

    def on_finish(self, backend: Backend, ok: bool) -> None:
        backend.in_flight = max(0, backend.in_flight - 1)
        self._record(backend, ok)

    def on_probe(self, name: str, ok: bool) -> None:
        """Result of an out-of-band health probe (e.g. gRPC health) of a group with a non-closed breaker."""
        backend = self._backends.get(name)
        if backend is not None and backend.breaker.state is not BreakerState.CLOSED:
            self._record(backend, ok)

    def set_health(self, name: str, healthy: bool) -> None:
        """External health: an unhealthy group gets no requests until marked healthy again."""
        if name in self._backends:
            self._backends[name].healthy = healthy

    def update_load(self, name: str, load: LoadLike) -> None:
        """Store a group's load report (ignored for groups discovery no longer lists)."""
        backend = self._backends.get(name)
        if backend is None:
            return
        backend.num_running, backend.num_waiting = load.num_running, load.num_waiting
        backend.kv_cache_usage = load.kv_cache_usage
        backend.load_reported_at = self._clock()

    def load_score(self, backend: Backend) -> float:
        """In-flight requests plus the weighted load report, if fresh."""
        score = float(backend.in_flight)
        at = backend.load_reported_at
        if at is not None and self._clock() - at <= self.config.load_report_ttl_s:
            score += self.config.report_weight * (backend.num_running + backend.num_waiting)
            score += self.config.kv_usage_weight * backend.kv_cache_usage
        return score

    def _record(self, backend: Backend, ok: bool) -> None:
        if ok:
            backend.breaker.record_success()
        else:
            backend.breaker.record_failure()
