"""The routed experts a rank owns (expert parallel: rank r owns experts [r*E/W, (r+1)*E/W))."""

from __future__ import annotations

import torch
from torch import nn

from worker.model.config import ModelConfig
from worker.model.layers.mlp import MLP
from worker.parallel import ParallelInfo


class LocalExperts(nn.Module):
    """Experts registered under their global ids (`experts.17.gate_proj`), exactly as the checkpoint names them."""

    def __init__(self, config: ModelConfig, info: ParallelInfo, dtype: torch.dtype):
        super().__init__()
        self.n_local_experts = info.split(config.n_routed_experts, "n_routed_experts")
        self.first_expert = info.ep_rank * self.n_local_experts
        for j in range(self.n_local_experts):
            self.add_module(str(self.first_expert + j), MLP(config.hidden_size, config.moe_intermediate_size, dtype))

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] token copies, local_ids [N] in [0, n_local) -> each copy through its expert [N, H]."""
        out = torch.zeros_like(x)
        if x.shape[0] == 0:
            return out
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=self.n_local_experts).tolist()
        start = 0
        for j, n in enumerate(counts):
            if n:
                rows = order[start : start + n]
                expert = getattr(self, str(self.first_expert + j))
                out[rows] = expert(x[rows])
            start += n
        return out
