"""The slowest rank's expert load in one MoE layer: what an expert-parallel step waits for.

Every MoE layer ends in an all-to-all, so a step runs at the pace of the rank with the most work, not
the average one. With T tokens in the group, each choosing k distinct experts of E (K2: 8 of 384) and
the experts split contiguously E / W per rank, rank r receives N_r token copies and runs D_r distinct
experts (each one a weight read from HBM). Both are random; the planner needs E[max_r N_r] and
E[max_r D_r].

Uniform routing (every expert equally likely, the load-balancing objective K2 was trained for):
  N_r ~ Binomial(k T, 1/W)      a token's copies land on rank r with probability 1/W each; this
                                ignores that a token's k experts are distinct, which lowers the
                                variance by (E - k) / (E - 1) (2% for K2)
  D_r ~ Binomial(E/W, p_hit)    p_hit = 1 - (1 - k/E)^T, the chance an expert is chosen at all
and the W ranks are treated as independent, so E[max] = sum over n >= 0 of 1 - F(n)^W with F the
binomial CDF. Against a simulation of top-8-of-384 routing (tests/test_plan.py) this errs low by about
6% at one token per group and under 2% from 64 tokens on. Measured routing is skewed (popular experts, popular
ranks); `rank_imbalance` (the measured max over mean of token copies per rank, e.g. from the worker's
per-expert counts through `rank_imbalance_from_expert_counts`) raises the slowest rank's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TAIL_SIGMAS = 12.0  # the CDF is evaluated within mean +- 12 sigma; beyond it, F is 0 or 1 to double precision


@dataclass(frozen=True)
class ExpertLoad:
    """One MoE layer's expert work per rank: the mean over ranks and the expected slowest rank."""

    num_tokens: float  # tokens in the group this step (every rank's together)
    mean_copies: float  # token copies a rank computes, on average: k T / W
    max_copies: float  # the slowest rank's token copies
    mean_experts: float  # distinct local experts a rank runs, on average
    max_experts: float  # the slowest rank's distinct experts

    @property
    def imbalance(self) -> float:
        """max / mean token copies: 1.0 is perfect balance."""
        return self.max_copies / self.mean_copies if self.mean_copies else 1.0


def expected_max_binomial(n: int, p: float, num_draws: int) -> float:
    """E[max of `num_draws` independent Binomial(n, p)] = sum over m >= 0 of 1 - P(X <= m)^draws."""
    if n <= 0 or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return float(n)
    mean, sigma = n * p, math.sqrt(n * p * (1 - p))
    lo = max(0, int(mean - TAIL_SIGMAS * sigma) - 1)
    hi = min(n, int(mean + TAIL_SIGMAS * sigma) + 2)
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_fact = math.lgamma(n + 1)
    cdf, total = 0.0, float(lo)  # every m below lo has P(max > m) = 1
    for m in range(lo, hi + 1):
        cdf += math.exp(log_n_fact - math.lgamma(m + 1) - math.lgamma(n - m + 1) + m * log_p + (n - m) * log_q)
        total += 1.0 - min(cdf, 1.0) ** num_draws
    return total


def expected_distinct_experts(n_local: float, n_experts: int, top_k: int, num_tokens: float) -> float:
    """E[distinct experts of a rank's n_local chosen by num_tokens tokens] = n_local (1 - (1 - k/E)^T)."""
    return n_local * (1.0 - (1.0 - top_k / n_experts) ** num_tokens)


def expert_load(
    n_experts: int, top_k: int, world_size: int, num_tokens: float, rank_imbalance: float | None = None
) -> ExpertLoad:
    """Mean and slowest-rank load of one MoE layer with `num_tokens` tokens in the group.

    `rank_imbalance` None: uniform routing, the expected maximum over ranks. A measured max/mean
    ratio r >= 1: the slowest rank computes max(uniform maximum, r * mean) copies and runs the distinct
    experts that r times the tokens would hit (its experts are r times as popular).
    """
    if n_experts % world_size:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by world_size={world_size} (EP)")
    if rank_imbalance is not None and rank_imbalance < 1.0:
        raise ValueError(f"rank_imbalance is max over mean, so at least 1.0; got {rank_imbalance}")
    n_local = n_experts // world_size
    copies = round(top_k * num_tokens)
    mean_copies = top_k * num_tokens / world_size
    p_hit = 1.0 - (1.0 - top_k / n_experts) ** num_tokens
    max_copies = expected_max_binomial(copies, 1.0 / world_size, world_size)
    max_experts = expected_max_binomial(n_local, p_hit, world_size)
    if rank_imbalance is not None:
        max_copies = max(max_copies, rank_imbalance * mean_copies)
        max_experts = max(max_experts, expected_distinct_experts(n_local, n_experts, top_k,
                                                                 rank_imbalance * num_tokens))
    return ExpertLoad(num_tokens, mean_copies, max_copies, n_local * p_hit, max_experts)


def rank_imbalance_from_expert_counts(counts: list[list[int]], world_size: int) -> float:
    """Mean over layers of max / mean token copies per rank, from measured per-expert counts.

    `counts[layer][expert]`: token copies routed to each expert (the worker's MoE statistics), experts
    placed contiguously, E / W per rank. Layers without tokens are skipped.
    """
    ratios = []
    for layer in counts:
        if len(layer) % world_size:
            raise ValueError(f"{len(layer)} experts are not divisible by world_size={world_size}")
        n_local = len(layer) // world_size
        per_rank = [sum(layer[r * n_local : (r + 1) * n_local]) for r in range(world_size)]
        if sum(per_rank):
            ratios.append(max(per_rank) * world_size / sum(per_rank))
    if not ratios:
        raise ValueError("expert counts hold no routed tokens")
    return sum(ratios) / len(ratios)
