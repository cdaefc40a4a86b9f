"""Attention layouts of one group compared, and the best one for a GPU: what the worker defaults to.

For a group of W ranks (EP = W) every attention TP size `tp` dividing W (and the head count) is a
layout: tp = W is today's (every rank holds every sequence's latent), tp = 1 full data-parallel
attention (each rank its own sequences), between them hybrids. Each layout is planned at a long and a
short context (128K and 2K tokens by default):
  memory       weights per GPU and the KV tokens each GPU holds (less as tp shrinks: attention, the
               dense layer and lm_head are replicated W / tp more times)
  concurrency  sequences the group holds at each context: (KV tokens per GPU // context) x W / tp
  throughput   decode tokens/s per GPU at the short context with as many sequences as fit (at most
               `max_batch_per_gpu` per GPU), decode at the long context with the sequences that fit,
               and prefill tokens/s per GPU
The best layout holds at least one long-context sequence in every partition (a layout that cannot
would cut the context the group serves) and, among those, decodes the most tokens/s per GPU at the
long context, then at the short one (whichever is larger by more than 5%, long context first).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from k2serve.cluster.gpus import gpu_spec
from k2serve.cluster.plan import build_plan
from k2serve.cluster.plan_config import PlanConfig, divisors
from k2serve.worker.model.config import ModelConfig

LONG_CONTEXT = 131072
SHORT_CONTEXT = 2048
MAX_BATCH_PER_GPU = 256  # decode tokens per rank per step: the CUDA-graph / low-latency all-to-all size engines use
CLOSE = 1.05  # throughputs within 5% count as a tie


@dataclass(frozen=True)
class LayoutReport:
    """One layout of the group planned at a long and a short context."""

    tp_size: int
    dp_size: int
    weights_per_gpu_bytes: float
    kv_tokens_per_gpu: int
    sequences_long: int
    sequences_short: int
    decode_long_tokens_per_s_per_gpu: float  # 0 when no long sequence fits
    decode_short_tokens_per_s_per_gpu: float
    decode_short_batch: int
    prefill_tokens_per_s_per_gpu: float

    @property
    def holds_long_context(self) -> bool:
        """At least one long-context sequence in every partition."""
        return self.sequences_long >= self.dp_size


def attention_tp_sizes(model: ModelConfig, num_gpus: int) -> list[int]:
    """The tp sizes a group of `num_gpus` can use: dividing the group and the attention heads."""
    return [tp for tp in divisors(num_gpus) if model.num_attention_heads % tp == 0]


def _decode_rate(model: ModelConfig, cfg: PlanConfig, batch: int) -> float:
    if batch < 1:
        return 0.0
    return build_plan(model, replace(cfg, batch=batch), gpu_spec(cfg.gpu)).decode_tokens_per_s_per_gpu


def plan_layout(model: ModelConfig, base: PlanConfig, tp: int, long_ctx: int, short_ctx: int) -> LayoutReport:
    """Plan the layout with attention TP `tp` (the rest of `base` unchanged)."""
    cfg = replace(base, tp_size=tp, context_len=long_ctx, kv_len=None, batch=1)
    plan = build_plan(model, cfg, gpu_spec(cfg.gpu))
    short_seqs = plan.kv_tokens_per_gpu // short_ctx * cfg.dp_size
    short_batch = min(short_seqs, MAX_BATCH_PER_GPU * cfg.num_gpus)
    long_batch = min(plan.max_sequences, MAX_BATCH_PER_GPU * cfg.num_gpus)
    return LayoutReport(
        tp_size=tp, dp_size=cfg.dp_size,
        weights_per_gpu_bytes=plan.weights_per_gpu_bytes, kv_tokens_per_gpu=plan.kv_tokens_per_gpu,
        sequences_long=plan.max_sequences, sequences_short=short_seqs,
        decode_long_tokens_per_s_per_gpu=_decode_rate(model, cfg, long_batch),
        decode_short_tokens_per_s_per_gpu=_decode_rate(model, replace(cfg, context_len=short_ctx), short_batch),
        decode_short_batch=short_batch,
        prefill_tokens_per_s_per_gpu=plan.prefill_tokens_per_s_per_gpu,
    )


def compare_layouts(model: ModelConfig, base: PlanConfig, long_ctx: int = LONG_CONTEXT,
                    short_ctx: int = SHORT_CONTEXT) -> list[LayoutReport]:
    """Every usable attention TP size for `base`'s group, largest tp (today's layout) first."""
    return [plan_layout(model, base, tp, long_ctx, short_ctx)
            for tp in sorted(attention_tp_sizes(model, base.num_gpus), reverse=True)]


def best_layout(reports: list[LayoutReport]) -> LayoutReport:
    """The layout the worker should default to (see the module docstring for the rule)."""
    candidates = [r for r in reports if r.holds_long_context] or reports

    def score(r: LayoutReport) -> tuple[float, float]:
        return (r.decode_long_tokens_per_s_per_gpu, r.decode_short_tokens_per_s_per_gpu)

    best = candidates[0]
    for r in candidates[1:]:
        if _better(score(r), score(best)):
            best = r
    return best


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a beats b: clearly more long-context throughput, or a tie there and clearly more short-context."""
    if a[0] > b[0] * CLOSE:
        return True
    if b[0] > a[0] * CLOSE:
        return False
    return a[1] > b[1] * CLOSE


def default_attention_tp(gpu: str, num_gpus: int, model: ModelConfig | None = None) -> int:
    """Attention TP size for a group of `num_gpus` `gpu`s serving `model` (default Kimi K2 Instruct).

    Pure arithmetic (no torch), for the cluster config to call when a group does not set `tp`.
    """
    model = model or ModelConfig()
    return best_layout(compare_layouts(model, PlanConfig(gpu=gpu.upper(), num_gpus=num_gpus,
                                                         tp_size=num_gpus))).tp_size
