"""Linear layers that own their sharding and their collective (STYLE 5).

Each weight carries a `ShardSpec` naming the dimension it is split along; the loader reads only
that slice from the checkpoint. Weights are held dense (dequantized) in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.parallel import ParallelInfo, all_reduce, reduce_scatter_tokens


@dataclass(frozen=True)
class ShardSpec:
    """A parameter holds slice `rank` of `world_size` equal slices of the checkpoint tensor along `dim`."""

    dim: int
    rank: int
    world_size: int


def shard_parameter(param: nn.Parameter, dim: int, info: ParallelInfo) -> nn.Parameter:
    param.shard = ShardSpec(dim, info.rank, info.world_size)
    return param


def new_weight(out_features: int, in_features: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """The whole [out, in] weight on every rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = new_weight(out_features, in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks: each rank computes [.., out / W]; no collective."""

    def __init__(self, in_features: int, out_features: int, info: ParallelInfo, dtype: torch.dtype = torch.float32):
        super().__init__()
        n_local_out = info.split(out_features, "output features")
        self.weight = shard_parameter(new_weight(n_local_out, in_features, dtype), 0, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial sums are reduced over the group.

    `reduce="all"` all-reduces (every rank gets [T, out]); `reduce="scatter"` reduce-scatters into
    token shards ([T_pad / W, out]) for the expert-parallel MoE that follows.
    """

    def __init__(
        self, in_features: int, out_features: int, info: ParallelInfo,
        dtype: torch.dtype = torch.float32, reduce: str = "all",
    ):
        super().__init__()
        if reduce not in ("all", "scatter"):
            raise ValueError(f"reduce must be 'all' or 'scatter', got {reduce!r}")
        self.info, self.reduce = info, reduce
        n_local_in = info.split(in_features, "input features")
        self.weight = shard_parameter(new_weight(out_features, n_local_in, dtype), 1, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.reduce == "scatter":
            return reduce_scatter_tokens(partial, self.info)
        return all_reduce(partial, self.info)
