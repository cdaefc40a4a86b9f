"""ParallelInfo and the collectives the parallel layers own.

One model replica spans `world_size` ranks: attention heads are split across them (tensor
parallel) and experts are owned by rank (expert parallel), so tp and ep share one process group.
With world_size 1 every collective is the identity, so the same layers run in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in its worker group; passed into every parallel layer's constructor."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup for tensor collectives (None: default group)
    control_group: Any = None  # gloo group for control messages (step plans), also on GPU

    @property
    def tp_rank(self) -> int:
        return self.rank

    @property
    def tp_size(self) -> int:
        return self.world_size

    @property
    def ep_rank(self) -> int:
        return self.rank

    @property
    def ep_size(self) -> int:
        return self.world_size

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def split(self, total: int, what: str) -> int:
        """This rank's equal share of `total`; raises if `total` does not divide."""
        if total % self.world_size:
            raise ValueError(f"{what}={total} is not divisible by world_size={self.world_size}")
        return total // self.world_size


def all_reduce(x: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """Sum partial results over the group (in place)."""
    if not info.is_single:
        dist.all_reduce(x, group=info.group)
    return x


def min_over_group(value: int, info: ParallelInfo) -> int:
    """The smallest of every rank's `value` (over the gloo control group, so on any backend)."""
    if info.is_single:
        return value
    t = torch.tensor([value], dtype=torch.long, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=info.control_group)
    return int(t.item())


def padded_token_count(num_tokens: int, info: ParallelInfo) -> int:
    """Tokens padded up to a multiple of world_size so they split evenly into shards."""
    return -(-num_tokens // info.world_size) * info.world_size


def reduce_scatter_tokens(x: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """[T, H] partial sums on every rank -> [T_pad / W, H] fully summed rows owned by this rank."""
    if info.is_single:
        return x
    num_tokens = x.shape[0]
    padded = padded_token_count(num_tokens, info)
    if padded != num_tokens:
        x = torch.cat([x, x.new_zeros(padded - num_tokens, x.shape[1])])
    out = x.new_empty(padded // info.world_size, x.shape[1])
    dist.reduce_scatter_tensor(out, x.contiguous(), group=info.group)
    return out


def token_shard(x: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """This rank's rows of a replicated [T, H] tensor, padded like reduce_scatter_tokens."""
    if info.is_single:
        return x
    num_tokens = x.shape[0]
    per_rank = padded_token_count(num_tokens, info) // info.world_size
    start = info.rank * per_rank
    shard = x[start : start + per_rank]
    if shard.shape[0] < per_rank:
        shard = torch.cat([shard, x.new_zeros(per_rank - shard.shape[0], x.shape[1])])
    return shard


def shard_valid_rows(num_tokens: int, info: ParallelInfo) -> int:
    """How many rows of this rank's token shard are real tokens (the rest is padding)."""
    per_rank = padded_token_count(num_tokens, info) // info.world_size
    return max(0, min(per_rank, num_tokens - info.rank * per_rank))


def all_gather_tokens(x: torch.Tensor, num_tokens: int, info: ParallelInfo) -> torch.Tensor:
    """[T_pad / W, H] shards -> [T, H] on every rank (padding dropped)."""
    if info.is_single:
        return x
    out = x.new_empty(x.shape[0] * info.world_size, x.shape[1])
    dist.all_gather_into_tensor(out, x.contiguous(), group=info.group)
    return out[:num_tokens]


def gather_last_dim(x: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """[N, D / W] on every rank -> [N, D] (every rank receives the whole)."""
    if info.is_single:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)
