"""MoE routing in float32: sigmoid scores, bias only for selection, group-limited top-k (docs/k2-format.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.worker.model.config import ModelConfig


class TopKRouter(nn.Module):
    """`mlp.gate`: returns (topk_ids [T, k] int64, topk_weights [T, k] float32)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.scoring_func != "sigmoid" or config.topk_method != "noaux_tc":
            raise ValueError(
                f"only sigmoid/noaux_tc routing is supported, got {config.scoring_func}/{config.topk_method}"
            )
        if config.n_routed_experts % config.n_group:
            raise ValueError(f"n_routed_experts={config.n_routed_experts} not divisible by n_group={config.n_group}")
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        e = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, E]
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1:
            biased = self.mask_groups(biased)
        topk_ids = biased.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, topk_ids)  # unbiased scores of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor

    def mask_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group groups with the highest sum of their two best biased scores."""
        grouped = biased.view(biased.shape[0], self.n_group, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view_as(biased)
