"""DeepSeek-V3 MoE block: routed experts (expert parallel, via a dispatcher) plus the shared expert."""

from __future__ import annotations

import torch
from torch import nn

from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.dispatcher import make_dispatcher
from k2serve.worker.model.layers.experts import LocalExperts
from k2serve.worker.model.layers.linear import Fp8Weights
from k2serve.worker.model.layers.mlp import MLP
from k2serve.worker.model.layers.moe_stats import MoELayerStats
from k2serve.worker.model.layers.router import TopKRouter
from k2serve.worker.parallel import ParallelInfo


class MoE(nn.Module):
    """Runs on this rank's token shard [n, H]; the dispatcher moves copies between ranks.

    `stats` counts what this layer routed and exchanged (drained by the runner's MoEStatsCollector).
    """

    def __init__(
        self, config: ModelConfig, info: ParallelInfo, dtype: torch.dtype, dispatcher: str = "all_to_all",
        layer_idx: int = 0, fp8: Fp8Weights | None = None,
    ):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = LocalExperts(config, info, dtype, fp8)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype, fp8)
        self.stats = MoELayerStats(layer_idx, config.n_routed_experts)
        self.dispatcher = make_dispatcher(dispatcher, info, self.stats)

    def forward(self, x: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
        """x [n, H]: this rank's token shard, of which the first `num_valid` rows are real tokens."""
        topk_ids, topk_weights = self.gate(x)  # [n, k], [n, k] float32
        self.stats.record_routing(topk_ids[:num_valid])
        routed = self.dispatcher.forward(x, topk_ids, topk_weights, self.experts)
        return routed + self.shared_experts(x)
