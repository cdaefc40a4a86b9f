"""Linear layers that own their sharding and their collective.

Each weight carries a `ShardSpec` naming the dimension it is split along; the loader reads only
that slice from the checkpoint. A layer holds its weight in one of two forms, chosen once at
construction: dense (dequantized into the model's dtype; the CPU path, numerically the torch
reference backend) or block-FP8 (`weight` e4m3 + `weight_scale_inv`, exactly as the checkpoint stores
them, multiplied by an `Fp8Backend`: the Triton kernels on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, FP8_DTYPE, block_scale_shape
from k2serve.worker.parallel import ParallelInfo, all_reduce, reduce_scatter_tokens


@dataclass(frozen=True)
class ShardSpec:
    """A parameter holds slice `rank` of `world_size` equal slices of the checkpoint tensor along `dim`."""

    dim: int
    rank: int
    world_size: int


@dataclass(frozen=True)
class Fp8Weights:
    """Keep block-FP8 matrices as stored and multiply them with `backend` (an kernels.Fp8Backend)."""

    backend: object
    block: tuple[int, int] = DEFAULT_BLOCK


def shard_parameter(param: nn.Parameter, dim: int, info: ParallelInfo) -> nn.Parameter:
    param.shard = ShardSpec(dim, info.rank, info.world_size)
    return param


def new_weight(out_features: int, in_features: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)


class _Linear(nn.Module):
    """y = x @ W^T with W dense or block-FP8 (see the module docstring)."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, fp8: Fp8Weights | None):
        super().__init__()
        self.fp8 = fp8
        if fp8 is None:
            self.weight = new_weight(out_features, in_features, dtype)
            return
        self.weight = new_weight(out_features, in_features, FP8_DTYPE)
        scale_shape = block_scale_shape((out_features, in_features), fp8.block)
        self.weight_scale_inv = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.weight)
        return self.fp8.backend.linear(x, self.weight, self.weight_scale_inv, self.fp8.block)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense matrix (dequantized when block-FP8)."""
        if self.fp8 is None:
            return self.weight.to(dtype)
        from k2serve.kernels.block_fp8 import dequantize_block_fp8

        return dequantize_block_fp8(self.weight, self.weight_scale_inv, self.fp8.block, dtype)

    def shard(self, dim: int, info: ParallelInfo) -> None:
        shard_parameter(self.weight, dim, info)


class ReplicatedLinear(_Linear):
    """The whole [out, in] weight on every rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 fp8: Fp8Weights | None = None):
        super().__init__(out_features, in_features, dtype, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks: each rank computes [.., out / W]; no collective."""

    def __init__(self, in_features: int, out_features: int, info: ParallelInfo, dtype: torch.dtype = torch.float32,
                 fp8: Fp8Weights | None = None):
        super().__init__(info.split(out_features, "output features"), in_features, dtype, fp8)
        self.shard(0, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial sums are reduced over the group.

    `reduce="all"` all-reduces (every rank gets [T, out]); `reduce="scatter"` reduce-scatters into
    token shards ([T_pad / W, out]) for the expert-parallel MoE that follows.
    """

    def __init__(
        self, in_features: int, out_features: int, info: ParallelInfo,
        dtype: torch.dtype = torch.float32, reduce: str = "all", fp8: Fp8Weights | None = None,
    ):
        if reduce not in ("all", "scatter"):
            raise ValueError(f"reduce must be 'all' or 'scatter', got {reduce!r}")
        super().__init__(out_features, info.split(in_features, "input features"), dtype, fp8)
        self.info, self.reduce = info, reduce
        self.shard(1, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.matmul(x)
        if self.reduce == "scatter":
            return reduce_scatter_tokens(partial, self.info)
        return all_reduce(partial, self.info)
