"""SwiGLU MLPs: `down(silu(gate(x)) * up(x))`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.worker.model.layers.linear import ColumnParallelLinear, Fp8Weights, ReplicatedLinear, RowParallelLinear
from k2serve.worker.parallel import ParallelInfo


class ParallelMLP(nn.Module):
    """Dense-layer MLP, tensor parallel: gate/up split by column, down by row with an all-reduce."""

    def __init__(self, hidden: int, intermediate: int, info: ParallelInfo, dtype: torch.dtype,
                 fp8: Fp8Weights | None = None):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, info, dtype, fp8)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, info, dtype, fp8)
        self.down_proj = RowParallelLinear(intermediate, hidden, info, dtype, fp8=fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """A whole SwiGLU MLP on one rank: a routed expert or the shared expert."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, fp8: Fp8Weights | None = None):
        super().__init__()
        self.gate_proj = ReplicatedLinear(hidden, intermediate, dtype, fp8)
        self.up_proj = ReplicatedLinear(hidden, intermediate, dtype, fp8)
        self.down_proj = ReplicatedLinear(intermediate, hidden, dtype, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
