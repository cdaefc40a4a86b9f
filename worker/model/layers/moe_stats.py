"""MoEStats: what the MoE layers of one rank routed and exchanged, accumulated between metric flushes.

The model writes into it on the hot path with cheap tensor adds; the serving side drains it (for
Prometheus: tokens per expert per layer, load imbalance, all-to-all time and bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MAX_SAMPLES = 4096


@dataclass
class MoEStatsSnapshot:
    expert_tokens: torch.Tensor  # [num_layers, n_routed_experts] int64: token copies routed to each expert
    exchanges: list[tuple[str, float, int]] = field(default_factory=list)  # (phase, seconds, bytes sent)


class MoEStats(nn.Module):
    """A module only so that its counts live on the model's device (they follow `model.to(device)`)."""

    def __init__(self, num_layers: int, n_routed_experts: int):
        super().__init__()
        self.register_buffer("expert_tokens", torch.zeros(num_layers, n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.exchanges: list[tuple[str, float, int]] = []

    def record_routing(self, layer_idx: int, topk_ids: torch.Tensor, num_valid: int | None = None) -> None:
        ids = topk_ids if num_valid is None else topk_ids[:num_valid]
        self.expert_tokens[layer_idx] += torch.bincount(ids.reshape(-1), minlength=self.expert_tokens.shape[1])

    def record_exchange(self, phase: str, seconds: float, num_bytes: int) -> None:
        if len(self.exchanges) < MAX_SAMPLES:
            self.exchanges.append((phase, seconds, num_bytes))

    def drain(self) -> MoEStatsSnapshot:
        snapshot = MoEStatsSnapshot(self.expert_tokens.clone(), self.exchanges)
        self.expert_tokens.zero_()
        self.exchanges = []
        return snapshot
