"""The routed experts a rank owns (expert parallel: rank r owns experts [r*E/W, (r+1)*E/W)).

Dense weights run expert by expert (CPU). Block-FP8 weights are stacked after loading into the fused
layout of kernels.moe_weights and run by the backend's fused MoE kernel in one call.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.linear import Fp8Weights
from k2serve.worker.model.layers.mlp import MLP
from k2serve.worker.parallel import ParallelInfo


class LocalExperts(nn.Module):
    """Experts registered under their global ids (`experts.17.gate_proj`), exactly as the checkpoint names them."""

    def __init__(self, config: ModelConfig, info: ParallelInfo, dtype: torch.dtype, fp8: Fp8Weights | None = None):
        super().__init__()
        self.fp8 = fp8
        self.is_fused = False  # FP8: per-expert matrices stacked into buffers w13_fp8, w13_scale, w2_fp8, w2_scale
        self.n_local_experts = info.split(config.n_routed_experts, "n_routed_experts")
        self.first_expert = info.ep_rank * self.n_local_experts
        for j in range(self.n_local_experts):
            self.add_module(self.expert_name(j), MLP(config.hidden_size, config.moe_intermediate_size, dtype, fp8))

    def expert_name(self, local_id: int) -> str:
        return str(self.first_expert + local_id)

    def process_weights_after_loading(self) -> None:
        """FP8: stack the loaded per-expert matrices into the fused layout and drop the per-expert copies."""
        if self.fp8 is None:
            return
        from k2serve.kernels.moe_weights import stack_experts

        experts = [getattr(self, self.expert_name(j)) for j in range(self.n_local_experts)]
        matrices = [[(getattr(e, p).weight, getattr(e, p).weight_scale_inv) for e in experts]
                    for p in ("gate_proj", "up_proj", "down_proj")]
        fused = stack_experts(*matrices)
        for j in range(self.n_local_experts):
            delattr(self, self.expert_name(j))
        for name, t in zip(("w13_fp8", "w13_scale", "w2_fp8", "w2_scale"), fused.as_args()):
            self.register_buffer(name, t, persistent=False)  # buffers follow .to(device)
        self.is_fused = True

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] token copies, local_ids [N] in [0, n_local) -> each copy through its expert [N, H]."""
        if self.is_fused:
            ones = torch.ones(local_ids.shape[0], 1, dtype=torch.float32, device=x.device)
            return self.fp8.backend.moe_experts(x, local_ids[:, None], ones, self.w13_fp8, self.w13_scale,
                                                self.w2_fp8, self.w2_scale, self.fp8.block)
        out = torch.zeros_like(x)
        if x.shape[0] == 0:
            return out
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=self.n_local_experts).tolist()
        start = 0
        for j, n in enumerate(counts):
            if n:
                rows = order[start : start + n]
                out[rows] = getattr(self, self.expert_name(j))(x[rows])
            start += n
        return out
