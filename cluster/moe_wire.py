"""Bytes an MoE layer's all-to-all moves between ranks: the one definition that `k2serve plan` and
benchmarks/moe_dispatch.py share.

"Bytes moved" are the bytes that leave the rank holding them for another rank, counted once at the
sender; copies routed to a rank's own experts stay local and cost nothing. Per MoE layer the
all-to-all dispatcher issues three collectives: a count exchange (how many copies each rank sends
each other rank), the dispatch (each remote token copy with its routing metadata) and the combine
(each expert output back to the token's rank).

Two wire formats:
  target   what the data-parallel-attention dispatcher sends and the planner assumes: the payload in
           bf16 (2H bytes) or FP8 (H bytes of e4m3 plus one fp32 scale per 128 channels, K2's
           activation quantization), an int32 expert id and the fp32 routing weight with every copy,
           int32 counts; the combine returns bf16 rows.
  current  what worker/model/layers/dispatcher.py AllToAllDispatcher sends today: the payload in the
           activation dtype and an int64 count per expert (each rank tells every other rank how many
           copies it sends to each of that rank's experts, which also tells the receiver each copy's
           expert, so no ids travel); the routing weights stay on the sending rank, which weights the
           combined rows itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BF16_BYTES = 2
FP32_BYTES = 4
INT32_BYTES = 4
INT64_BYTES = 8
FP8_SCALE_GROUP = 128  # K2's dynamic activation quantization: one fp32 scale per 128 channels


@dataclass(frozen=True)
class WireFormat:
    """Element sizes on the wire. The field defaults are today's dispatcher; see `target` and `current`."""

    hidden_size: int
    act_bytes: int = BF16_BYTES  # hidden states, expert outputs, partial sums
    fp8_dispatch: bool = False  # dispatch payload as e4m3 + fp32 per-128 scales (combine stays act_bytes)
    id_bytes: int = INT64_BYTES
    weight_bytes: int = FP32_BYTES
    count_bytes: int = INT64_BYTES
    sends_weights: bool = False  # the routing weight travels with each copy (else the sender keeps it)
    sends_ids: bool = False  # each copy's expert id travels with it (else per-expert counts imply it)
    counts_per_expert: bool = True  # the count exchange has one count per expert (else one per rank)

    @classmethod
    def target(cls, hidden_size: int, fp8_dispatch: bool) -> "WireFormat":
        """The planned dispatcher: bf16 or FP8 payload, int32 id + fp32 weight per copy, int32 counts."""
        return cls(hidden_size, BF16_BYTES, fp8_dispatch, INT32_BYTES, FP32_BYTES, INT32_BYTES, sends_weights=True,
                   sends_ids=True, counts_per_expert=False)

    @classmethod
    def current(cls, hidden_size: int, act_bytes: int = BF16_BYTES) -> "WireFormat":
        """Today's AllToAllDispatcher: activation-dtype payload, int64 per-expert counts, weights kept home."""
        return cls(hidden_size, act_bytes)

    @property
    def dispatch_row_bytes(self) -> int:
        """One token copy's hidden state as dispatched: H * act_bytes, or H + ceil(H/128) * 4 in FP8."""
        if self.fp8_dispatch:
            return self.hidden_size + math.ceil(self.hidden_size / FP8_SCALE_GROUP) * FP32_BYTES
        return self.hidden_size * self.act_bytes

    @property
    def routing_bytes_per_copy(self) -> int:
        """Metadata riding with one dispatched copy: its expert id and its routing weight, if sent."""
        return (self.id_bytes if self.sends_ids else 0) + (self.weight_bytes if self.sends_weights else 0)

    def count_exchange_bytes(self, world_size: int, n_routed_experts: int) -> int:
        """One layer's count exchange over all ranks: every rank sends every other rank one count, or one
        per expert that rank owns."""
        if self.counts_per_expert and not n_routed_experts:
            raise ValueError("per-expert counts need n_routed_experts")
        per_pair = n_routed_experts // world_size if self.counts_per_expert else 1
        return world_size * (world_size - 1) * per_pair * self.count_bytes

    @property
    def combine_row_bytes(self) -> int:
        """One expert output (or partial-sum row) sent back: H * act_bytes."""
        return self.hidden_size * self.act_bytes


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one MoE layer moves across ranks: payload out, routing metadata, payload back."""

    dispatch: float  # all-to-all: copies to their experts' ranks; all-gather: hidden states
    routing: float  # all-to-all: ids (+ weights) and the count exchange; all-gather: ids + weights
    combine: float  # all-to-all: expert outputs back; all-gather: reduce-scatter of partial sums

    @property
    def total(self) -> float:
        return self.dispatch + self.routing + self.combine


def all_to_all_bytes(
    num_remote_copies: float, world_size: int, fmt: WireFormat, count_exchange: bool = True, n_routed_experts: int = 0
) -> LayerBytes:
    """dispatch = R * row, routing = R * ([id] [+ weight]) + the count exchange, combine = R * H * act.

    R (`num_remote_copies`) may be an expectation or one rank's share; `count_exchange=False` leaves
    out the per-layer count exchange, a fixed cost that does not scale with tokens (per-expert counts
    need `n_routed_experts`).
    """
    counts = fmt.count_exchange_bytes(world_size, n_routed_experts) if count_exchange else 0
    return LayerBytes(
        dispatch=num_remote_copies * fmt.dispatch_row_bytes,
        routing=num_remote_copies * fmt.routing_bytes_per_copy + counts,
        combine=num_remote_copies * fmt.combine_row_bytes,
    )


def expected_remote_copies(top_k: int, world_size: int) -> float:
    """Copies per token that leave its rank under uniform routing: k * (W - 1) / W."""
    return top_k * (world_size - 1) / world_size


def bytes_per_token_per_layer(top_k: int, world_size: int, fmt: WireFormat) -> LayerBytes:
    """Expected all-to-all bytes one token costs in one MoE layer under uniform routing (count
    exchange left out): its k * (W - 1) / W remote copies out, with their metadata, and back."""
    return all_to_all_bytes(expected_remote_copies(top_k, world_size), world_size, fmt, count_exchange=False)
