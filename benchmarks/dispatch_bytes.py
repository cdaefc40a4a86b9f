"""Bytes one MoE layer moves across ranks under each dispatcher: the analytic model behind
benchmarks/moe_dispatch.py (pure arithmetic over a routing; nothing here communicates).

What "bytes moved" means: every byte that leaves the rank holding it for another rank, counted once at
its sender and summed over all ranks. Bytes a rank keeps (copies routed to its own experts, its own
chunk of a reduce-scatter) cost nothing. This is the logical traffic of each collective (ring
all-gather and reduce-scatter move exactly this much); per-message headers and padding are ignored.

  all-to-all (worker/model/layers/dispatcher.py AllToAllDispatcher as it is today), R = token copies
  whose expert lives on another rank, E = routed experts:
      counts   = (W - 1) * E * 8                      per-expert int64 counts, once per layer
      dispatch = R * row_bytes                        hidden row (its expert follows from the counts)
      combine  = R * H * 2                            expert outputs back, bf16
    row_bytes = H * 2 for a bf16 payload; H + ceil(H / 128) * 4 for an FP8 payload (e4m3 + one fp32
    scale per 128 channels, K2's activation quantization).
  all-gather (AllGatherDispatcher), T = W * n tokens in the step (n per rank):
      all-gather     = (W - 1) * T * (H * 2 + k * 8 + k * 4)   hidden row, int64 ids, fp32 weights
      reduce-scatter = (W - 1) * T * H * 2                      [T, H] bf16 partial sums
  The all-to-all wire formats (today's, above, and the target one `k2serve plan` assumes: int32 ids
  and counts, the fp32 routing weight with each copy) and their byte formulas live in
  k2serve.cluster.moe_wire, shared with the planner; this module adds the all-gather baseline and
  counts over concrete routings.
  Under uniform routing a copy leaves its rank with probability (W - 1) / W, so a decode token costs
  the all-to-all 2 * k * (W - 1) / W * H * 2 payload bytes per layer (200,704 for K2 on 8 ranks) and
  the all-gather 2 * (W - 1) * H * 2 (also 200,704): equal at W = k, and the all-gather grows with W.
"""

from __future__ import annotations

import math
from dataclasses import astuple

import torch

from k2serve.cluster.moe_wire import (
    LayerBytes,
    WireFormat,
    all_to_all_bytes,
    bytes_per_token_per_layer,
    expected_remote_copies,
)
from k2serve.worker.model.config import ModelConfig

__all__ = [
    "LayerBytes", "WireFormat", "all_gather_bytes", "all_to_all_bytes", "bytes_per_layer", "expected_remote_copies",
    "expected_remote_ranks", "num_moe_layers", "per_token_bytes", "remote_copies",
]


def remote_copies(topk_ids_per_rank: list[torch.Tensor], n_local_experts: int) -> int:
    """Token copies whose expert is owned by another rank; rank r owns experts [r*n_local, (r+1)*n_local)."""
    total = 0
    for rank, topk_ids in enumerate(topk_ids_per_rank):  # [n_r, k] global expert ids
        total += int((topk_ids // n_local_experts != rank).sum())
    return total


def all_gather_bytes(num_tokens: int, world_size: int, top_k: int, fmt: WireFormat) -> LayerBytes:
    """All-gather of each rank's rows to the W-1 others, then reduce-scatter of [T, H] partial sums.

    dispatch = (W-1) * T * row, routing = (W-1) * T * k * (id + weight), combine = (W-1) * T * H * act,
    with T the tokens of all ranks together and row = H * act as the dispatcher sends it. Independent of
    the routing.
    """
    others = (world_size - 1) * num_tokens
    return LayerBytes(
        dispatch=others * fmt.dispatch_row_bytes,
        routing=others * top_k * (fmt.id_bytes + fmt.weight_bytes),
        combine=others * fmt.combine_row_bytes,
    )


def bytes_per_layer(
    topk_ids_per_rank: list[torch.Tensor], n_routed_experts: int, fmt: WireFormat
) -> dict[str, LayerBytes]:
    """Bytes per layer of each dispatcher for one concrete routing ([n, k] global expert ids per rank)."""
    world_size = len(topk_ids_per_rank)
    if n_routed_experts % world_size:
        raise ValueError(f"n_routed_experts={n_routed_experts} is not divisible by world_size={world_size}")
    num_tokens = sum(t.shape[0] for t in topk_ids_per_rank)
    top_k = topk_ids_per_rank[0].shape[1]
    remote = remote_copies(topk_ids_per_rank, n_routed_experts // world_size)
    return {
        "all_to_all": all_to_all_bytes(remote, world_size, fmt, n_routed_experts=n_routed_experts),
        "all_gather": all_gather_bytes(num_tokens, world_size, top_k, fmt),
    }


def expected_remote_ranks(n_routed_experts: int, top_k: int, world_size: int) -> float:
    """Distinct other ranks a token's k distinct experts touch under uniform routing.

    (W - 1) * (1 - C(E - E/W, k) / C(E, k)): what a dispatcher sending one copy per destination rank
    (DeepEP-style, not implemented here) would send.
    """
    miss = math.comb(n_routed_experts - n_routed_experts // world_size, top_k) / math.comb(n_routed_experts, top_k)
    return (world_size - 1) * (1 - miss)


def per_token_bytes(config: ModelConfig, world_size: int, fp8_dispatch: bool) -> dict[str, LayerBytes]:
    """Expected bytes per decode token per MoE layer under uniform routing, count exchange left out.

    "all_to_all" is today's dispatcher (per-expert counts, no ids, weights kept home) with the payload asked for;
    "all_to_all_target" is the format the planner assumes, from the same function it uses.
    """
    fmt = WireFormat.current(config.hidden_size)
    if fp8_dispatch:
        fmt = WireFormat(config.hidden_size, fp8_dispatch=True)
    k = config.num_experts_per_tok
    dedup = expected_remote_ranks(config.n_routed_experts, k, world_size)
    per_rank_copy = LayerBytes(fmt.dispatch_row_bytes, k * (fmt.id_bytes + fmt.weight_bytes), fmt.combine_row_bytes)
    target = WireFormat.target(config.hidden_size, fp8_dispatch)
    return {
        "all_to_all": bytes_per_token_per_layer(k, world_size, fmt),
        "all_to_all_target": bytes_per_token_per_layer(k, world_size, target),
        "all_gather": all_gather_bytes(1, world_size, k, WireFormat(config.hidden_size)),
        "per_rank_copy": LayerBytes(*(dedup * v for v in astuple(per_rank_copy))),
    }


def num_moe_layers(config: ModelConfig) -> int:
    """MoE layers of a config (60 for K2: 61 layers, the first dense)."""
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
