"""Scheduler: continuous batching with chunked prefill, prefix caching and preemption (no torch).

Each step it decides which requests run and how many of their tokens: decodes first, then prefill
chunks of running requests, then new admissions, all under a token budget. The result, a `StepPlan`, is
a picklable bundle of Python lists (it is broadcast to every tensor-parallel rank). When KV blocks run
out, the newest running request is preempted: its blocks are freed and it is recomputed later from its
tokens (prompt + output so far), so nothing it produced is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_cache import KVCacheManager
from k2serve.worker.request import Request, RequestRejected, RequestStatus


@dataclass
class StepPlan:
    """What one step computes: per scheduled sequence, its new tokens and where its cache lives."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # new tokens of each sequence
    context_lens: list[int] = field(default_factory=list)  # tokens already cached before this step
    block_tables: list[list[int]] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)  # whether the sequence samples a token this step
    block_size: int = 16
    # Every rank times this step's MoE exchanges, then collects its MoE statistics and sums them over the
    # group (rank 0 sets it about once a second when it records metrics, and on an otherwise empty plan
    # when earlier steps' statistics are still uncollected).
    collect_moe_stats: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids

    @property
    def sampling_request_ids(self) -> list[str]:
        return [r for r, s in zip(self.request_ids, self.sample) if s]

    def add(self, request: Request, num_new: int, block_table: list[int]) -> None:
        start = request.num_computed_tokens
        self.request_ids.append(request.request_id)
        self.token_ids.append(request.token_ids[start:start + num_new])
        self.context_lens.append(start)
        self.block_tables.append(list(block_table))
        self.sample.append(start + num_new == request.num_tokens)


class Scheduler:
    """Owns the waiting and running queues and the KV cache manager's per-request allocations."""

    def __init__(self, config: EngineConfig, kv_cache: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- submission and removal ----

    def add(self, request: Request) -> None:
        """Queue a request; RequestRejected if it can never run or the queue is full."""
        self._check_admissible(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _check_admissible(self, request: Request) -> None:
        rid, n = request.request_id, request.num_prompt_tokens
        if rid in self.requests:
            raise RequestRejected(f"request id {rid!r} is already in use")
        if n >= self.max_model_len:
            raise RequestRejected(f"prompt of {n} tokens leaves no room to generate within the context "
                                  f"length of {self.max_model_len} tokens")
        if request.max_new_tokens is not None and n + request.max_new_tokens > self.max_model_len:
            raise RequestRejected(f"prompt ({n} tokens) + max_tokens ({request.max_new_tokens}) = "
                                  f"{n + request.max_new_tokens} exceeds the context length of "
                                  f"{self.max_model_len} tokens")
        cache_tokens = self.kv_cache.num_blocks * self.kv_cache.block_size
        if request.max_new_tokens is not None and n + request.max_new_tokens > cache_tokens:
            raise RequestRejected(f"prompt ({n} tokens) + max_tokens ({request.max_new_tokens}) needs more KV "
                                  f"cache than this worker has in all ({cache_tokens} tokens)")
        if n >= cache_tokens:
            raise RequestRejected(f"prompt of {n} tokens needs more KV cache than this worker has in all "
                                  f"({cache_tokens} tokens)")
        if len(self.waiting) >= self.config.max_num_waiting:
            raise RequestRejected(f"queue full ({len(self.waiting)} waiting requests); retry later", status=429)
        if request.max_new_tokens is None:  # unset: up to the context (or the whole cache) is full
            request.max_new_tokens = min(self.max_model_len, cache_tokens) - n

    def abort(self, request_id: str) -> Request | None:
        """Remove a request at once and free its blocks; None if unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request_id)
        request.finish(RequestStatus.FINISHED_ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----

    def schedule(self) -> StepPlan:
        """Pick this step's work: decodes, then running prefill chunks, then admissions (if no preemption)."""
        plan = StepPlan(block_size=self.kv_cache.block_size)
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(plan, budget)
        if not preempted:
            self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1]
        prefills = [r for r in self.running if r.num_uncomputed_tokens > 1]
        scheduled: set[str] = set()
        preempted = False
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self._reserve(request, num_new, scheduled):
                preempted = True
                continue
            plan.add(request, num_new, self.kv_cache.block_table(request.request_id))
            scheduled.add(request.request_id)
            budget -= num_new
        return budget, preempted

    def _reserve(self, request: Request, num_new: int, scheduled: set[str]) -> bool:
        """Allocate blocks for `num_new` more tokens, preempting the newest unscheduled requests."""
        while not self.kv_cache.allocate(request.request_id, request.num_computed_tokens + num_new):
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(request.token_ids)
            num_cached = len(cached) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate(request.request_id, num_cached + num_new, cached):
                break
            if request.num_preemptions == 0:  # prompt tokens only: a continuation's output may be cached too
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
                self.kv_cache.record_lookup(request.num_prompt_tokens, request.num_cached_tokens)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            plan.add(request, num_new, self.kv_cache.block_table(request.request_id))
            budget -= num_new

    # ---- after the step ----

    def update(self, plan: StepPlan, sampled: dict[str, int], logprobs: dict | None = None) -> list[Request]:
        """Advance computed counts, register full blocks, append sampled tokens; return finished requests."""
        finished = []
        for request_id, new_tokens in zip(plan.request_ids, plan.token_ids):
            request = self.requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += len(new_tokens)
            self.kv_cache.cache_full_blocks(request_id, request.token_ids, request.num_computed_tokens)
            if request_id in sampled:
                request.append_token(sampled[request_id], (logprobs or {}).get(request_id))
                if request.is_finished:
                    self._remove_finished(request)
                    finished.append(request)
        return finished

    def finish(self, request_id: str, status: RequestStatus, error: str | None = None,
               error_status: int = 500) -> Request | None:
        """End a running or waiting request with `status` (e.g. an error) and free its blocks."""
        request = self.abort(request_id)
        if request is not None:
            request.finish(status, error, error_status)
        return request

    def _remove_finished(self, request: Request) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        self.kv_cache.free(request.request_id)
