"""Engine: the step loop of one worker (schedule -> execute -> postprocess), single-threaded.

`add_request` validates and queues; `step` runs one forward pass over everything scheduled and returns
a RequestOutput for every request that produced tokens or finished; `abort_request` frees a request's
blocks at once. AsyncEngine (worker/async_engine.py) drives it from a background thread.

With metrics attached (a WorkerMetrics, constructor argument or `attach_metrics`), every step records
its duration, batch size and token split, the scheduler/KV cache state, and, about once a second, the
group's MoE expert load and all-to-all traffic: the step's plan asks every rank to collect them
(`collect_moe_stats`) and the runner's result carries them back. A step with nothing scheduled still
collects what earlier steps left, so the metrics catch up when the engine goes idle.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_cache import KVCacheManager
from k2serve.worker.metrics import EngineMetrics, EngineState, WorkerMetrics
from k2serve.worker.kv_sizing import MemoryProbe
from k2serve.worker.model_runner import ForwardResult, ModelRunner
from k2serve.worker.request import Request, RequestOutput, RequestRejected, RequestStatus, SamplingParams, TokenLogprob
from k2serve.worker.sampler import Sampler
from k2serve.worker.scheduler import Scheduler, StepPlan
from k2serve.worker.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What rank 0 sampled in one step: a token (and optional logprobs) per sampling request."""

    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob]


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int


def _servable_len(max_model_len: int, cache_tokens: int) -> int:
    """The longest sequence this engine can serve: no sequence outgrows the whole KV cache. Advertised as
    the context length, so that clients (and the router's default max_tokens) stay within it."""
    if max_model_len <= cache_tokens:
        return max_model_len
    log.warning("max_model_len %d exceeds the KV cache (%d tokens): sequences are served up to %d tokens; "
                "give the cache more memory to serve longer ones", max_model_len, cache_tokens, cache_tokens)
    return cache_tokens


class Engine:
    """Continuous-batching engine over a ModelRunner; `vocab` gives stop ids and enables guided output."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, vocab: Vocab | None = None,
                 metrics: WorkerMetrics | None = None, moe_stats_interval_s: float = 1.0):
        self.config = config
        self.runner = runner
        self.vocab = vocab
        self.vocab_size = runner.vocab_size
        kv_cache = KVCacheManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_model_len = _servable_len(config.max_model_len or runner.model.config.max_position_embeddings,
                                           runner.num_blocks * config.block_size)
        self.scheduler = Scheduler(config, kv_cache, self.max_model_len)
        self.sampler = Sampler()
        self.default_stop_ids = frozenset(vocab.stop_token_ids) if vocab else frozenset()
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._guided = None  # GuidedDecoding, built on the first guided request
        self._guided_lock = threading.Lock()
        self.metrics: EngineMetrics | None = None
        if metrics is not None:
            self.attach_metrics(metrics, moe_stats_interval_s)

    def attach_metrics(self, metrics: WorkerMetrics, moe_stats_interval_s: float = 1.0) -> None:
        """Record into `metrics` from now on; MoE stats are collected every `moe_stats_interval_s`."""
        self.metrics = EngineMetrics(metrics, moe_stats_interval_s)
        self._record_state()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig = EngineConfig(),
                       probe: MemoryProbe | None = None) -> "Engine":
        """One process: load the checkpoint onto `config.device`, size the KV cache (worker/kv_sizing.py;
        `probe` replaces the device's memory probe) and build the engine."""
        from k2serve.worker.runner_loader import load_runner

        runner = load_runner(model_dir, config, probe=probe)
        return cls(config, runner, Vocab.from_model_dir(model_dir, runner.vocab_size))

    # ---- requests ----

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    output_ids: Sequence[int] = ()) -> None:
        """Validate and queue a request; raises RequestRejected (with an HTTP-like status) if refused.

        `output_ids` makes it a continuation (Request.resume): the tokens it already generated on another
        group. A continuation those tokens already finished ends at once, with no new token.
        """
        params.validate(self.vocab_size, self.config.max_top_logprobs)
        bad = [t for t in (*prompt_ids, *output_ids) if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        request = Request(request_id, prompt_ids, params, self._stop_ids(params),
                          params.max_tokens or self.config.default_max_tokens)
        if params.guided is not None:
            request.guide = self._guided_decoding().new_guide(params.guided)
        self._resume(request, output_ids)
        if request.is_finished:
            self._pending.append(request.take_output())
            return
        self.scheduler.add(request)

    @staticmethod
    def _resume(request: Request, output_ids: Sequence[int]) -> None:
        """A continuation's tokens: counted as generated, and fed to its grammar, which must accept them."""
        request.resume(output_ids)
        if request.guide is not None and not all(request.guide.accept(t) for t in output_ids):
            raise RequestRejected("output_token_ids do not match the request's structured-output grammar")

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = frozenset(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.default_stop_ids

    def compile_guide(self, spec) -> None:
        """Compile `spec`'s grammar into the cache (RequestRejected if it does not compile). Thread-safe:
        AsyncEngine calls it off the engine thread, since a large grammar compiles for seconds (xgrammar
        releases the GIL meanwhile), and add_request then finds it compiled."""
        self._guided_decoding().compile(spec)

    def _guided_decoding(self):
        with self._guided_lock:  # built once, by whichever thread asks first
            if self._guided is None:
                from k2serve.worker.guided import GuidedDecoding

                if self.vocab is None:
                    raise RequestRejected("structured output needs the checkpoint's vocabulary", status=400)
                self._guided = GuidedDecoding(self.vocab, self.vocab_size)
            return self._guided

    def abort_request(self, request_id: str) -> bool:
        """Abort a waiting or running request and free its blocks now; False if unknown or finished."""
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._pending.append(request.take_output())
            self._record_state()
        return request is not None

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every in-flight request with an error output (after an engine failure)."""
        outputs = []
        for request_id in list(self.scheduler.requests):
            request = self.scheduler.finish(request_id, RequestStatus.FINISHED_ERROR, message)
            if request is not None:
                outputs.append(request.take_output())
        self._record_state()
        return self._take_pending() + outputs

    def heartbeat(self) -> None:
        """A no-op step through every rank of the group (nothing scheduled, no state changes); raises when
        a rank cannot take part. AsyncEngine runs it while idle, from the thread that steps the engine."""
        self.runner.heartbeat()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def has_uncollected_moe_stats(self) -> bool:
        """Whether steps ran since the group's MoE statistics were last collected: a step with nothing
        scheduled then collects them (AsyncEngine runs one when it goes idle)."""
        return self.metrics is not None and self.metrics.moe_stats_due(idle=True)

    def get_load(self) -> EngineLoad:
        kv = self.scheduler.kv_cache
        return EngineLoad(len(self.scheduler.running), len(self.scheduler.waiting), kv.usage, kv.hit_rate,
                          self.scheduler.num_preemptions)

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute (forward + sample), postprocess. With nothing scheduled it runs
        only when the MoE statistics of earlier steps are still to be collected."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        plan.collect_moe_stats = self.metrics is not None and self.metrics.moe_stats_due(plan.is_empty)
        if plan.is_empty and not plan.collect_moe_stats:
            self._record_state()
            return self._take_pending()
        if plan.collect_moe_stats:
            self.metrics.collecting(plan.is_empty)  # before the collective: a failing one is not retried
        prompt_tokens = self._num_prompt_tokens(plan) if self.metrics is not None else 0
        result = self.runner.execute(plan)
        step_output = self._sample(plan, result)
        outputs = self._postprocess(plan, step_output)
        if self.metrics is not None:
            self._record_step(plan, result, prompt_tokens, len(step_output.sampled), time.perf_counter() - start)
        return outputs

    def _sample(self, plan: StepPlan, result: ForwardResult) -> StepOutput:
        logits = result.logits  # [N, vocab] for the sampling sequences
        if logits is None:
            return StepOutput({}, {})
        requests = [self.scheduler.requests[r] for r in plan.sampling_request_ids]
        guides = [r.guide for r in requests]
        apply = None
        if any(g is not None for g in guides):
            apply = lambda lg: self._guided.apply_masks(lg, guides)  # noqa: E731
        out = self.sampler(logits, requests, apply)
        sampled = {r.request_id: t for r, t in zip(requests, out.token_ids)}
        logprobs = {r.request_id: lp for r, lp in zip(requests, out.logprobs) if lp is not None}
        return StepOutput(sampled, logprobs)

    def _postprocess(self, plan: StepPlan, step_output: StepOutput) -> list[RequestOutput]:
        rejected = self._advance_guides(step_output.sampled)
        done = {r.request_id: r for r in self.scheduler.update(plan, step_output.sampled, step_output.logprobs)}
        done.update(self._finish_guided(step_output.sampled, rejected))
        outputs = self._take_pending()
        for request_id in step_output.sampled:
            request = self.scheduler.requests.get(request_id) or done.get(request_id)
            if request is not None:
                outputs.append(request.take_output())
        return outputs

    def _advance_guides(self, sampled: dict[str, int]) -> set[str]:
        """Feed each sampled token to its request's grammar matcher; ids whose token it rejected."""
        rejected = set()
        for request_id, token in sampled.items():
            guide = self.scheduler.requests[request_id].guide
            if guide is not None and not guide.accept(token):
                rejected.add(request_id)
        return rejected

    def _finish_guided(self, sampled: dict[str, int], rejected: set[str]) -> dict[str, Request]:
        """End requests whose grammar rejected a token (error) or is complete (stop, e.g. ignore_eos)."""
        done = {}
        for request_id in sampled:
            request = self.scheduler.requests.get(request_id)
            if request is None or request.guide is None:
                continue
            if request_id in rejected:  # the mask left no token: the grammar needs what the vocabulary lacks
                done[request_id] = self.scheduler.finish(
                    request_id, RequestStatus.FINISHED_ERROR, "the requested format cannot be produced: at this "
                    "point its grammar allows no token of the model's vocabulary", error_status=400)
            elif request.guide.is_terminated:
                done[request_id] = self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED)
        return done

    # ---- metrics ----

    def _num_prompt_tokens(self, plan: StepPlan) -> int:
        """Tokens of the plan that are prompt positions (prefill; recomputation after preemption included)."""
        total = 0
        for request_id, tokens, ctx in zip(plan.request_ids, plan.token_ids, plan.context_lens):
            num_prompt = self.scheduler.requests[request_id].num_prompt_tokens
            total += max(0, min(ctx + len(tokens), num_prompt) - ctx)
        return total

    def _record_step(self, plan: StepPlan, result: ForwardResult, prompt_tokens: int, generated: int,
                     seconds: float) -> None:
        if not plan.is_empty:
            self.metrics.step(seconds, plan.num_tokens, prompt_tokens, generated, plan.collect_moe_stats)
        if result.moe_stats is not None:
            self.metrics.moe(result.moe_stats)
        self._record_state()

    def _record_state(self) -> None:
        if self.metrics is None:
            return
        kv = self.scheduler.kv_cache
        self.metrics.state(EngineState(
            len(self.scheduler.running), len(self.scheduler.waiting), kv.usage, kv.hit_rate,
            kv.num_queried_tokens, kv.num_hit_tokens, self.scheduler.num_preemptions))

    def _take_pending(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        return outputs

    # ---- offline ----

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (batched) and return each one's generated token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]
