"""The routed experts a rank owns (expert parallel: rank r owns experts [r*E/W, (r+1)*E/W)).

Dense weights run expert by expert (CPU). Block-FP8 weights are stacked after loading into the fused
layout of kernels.moe_weights and run by the backend's fused MoE kernel in one call, which reads
nothing back to the host.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.linear import Fp8Weights
from k2serve.worker.model.layers.mlp import MLP
from k2serve.worker.model.layers.moe_stats import expert_histogram
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

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                counts: list[int] | None = None) -> torch.Tensor:
        """x [N, H], topk_ids [N, k] global expert ids, topk_weights [N, k] float32 -> [N, H] in x's dtype:
        each row's weighted sum over its experts that live on this rank (the others are skipped).

        `counts`: pairs per local expert, when the caller already has them on the host (dense experts
        need them; without them they read them back once)."""
        if self.is_fused:
            return self.fp8.backend.moe_experts(x, topk_ids, topk_weights, self.w13_fp8, self.w13_scale,
                                                self.w2_fp8, self.w2_scale, self.fp8.block, self.first_expert)
        n, k = topk_ids.shape
        local = topk_ids.reshape(-1) - self.first_expert  # [N * k]
        key = torch.where((local >= 0) & (local < self.n_local_experts), local, self.n_local_experts)
        order = torch.argsort(key, stable=True)  # pairs grouped by local expert, other ranks' last
        if counts is None:
            counts = expert_histogram(key, self.n_local_experts + 1)[:-1].tolist()
        outputs = x.new_zeros(n * k, x.shape[1])  # [N * k, H]; pairs of other ranks' experts stay 0
        start = 0
        for j, count in enumerate(counts):
            if count:
                pairs = order[start:start + count]
                outputs[pairs] = getattr(self, self.expert_name(j))(x[pairs // k])
            start += count
        token_of_pair = torch.arange(n * k, device=x.device) // k
        return weighted_sum(outputs, token_of_pair, topk_weights.reshape(-1), n)


def weighted_sum(outputs: torch.Tensor, token_of_copy: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Sum each token's expert outputs [N, H] weighted by [N] into [n, H] (in float32, then cast)."""
    y = torch.zeros(n, outputs.shape[1], dtype=torch.float32, device=outputs.device)
    y.index_add_(0, token_of_copy, outputs.float() * weights[:, None])
    return y.to(outputs.dtype)
