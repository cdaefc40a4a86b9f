"""The sort/align step of fused MoE: group (token, slot) pairs by local expert, pad each group to BLOCK_M.

Pure torch and free of host synchronization (the padded total stays on the device), so it can run
inside a captured step. Experts without tokens get no blocks; pairs whose expert is not local
(`topk_ids - expert_offset` outside [0, E)) are dropped, which is how expert parallelism uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoeAlignment:
    """Pairs sorted by expert, each expert's run padded to a multiple of `block_m`.

    Pair id `p = token * top_k + slot`; padding rows hold `num_pairs` (one past the last pair).
    Only the first `num_padded` rows (a device scalar) are meaningful; blocks past it are idle.
    """

    sorted_pair_ids: torch.Tensor  # [max_rows] int32
    block_expert_ids: torch.Tensor  # [max_rows // block_m] int32, local expert of each block
    num_padded: torch.Tensor  # [1] int32
    block_m: int
    num_pairs: int

    @property
    def max_rows(self) -> int:
        return self.sorted_pair_ids.numel()


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst case of sum(ceil(count_e / block_m) * block_m): every used expert wastes block_m - 1 rows."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def align_tokens_to_experts(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0
) -> MoeAlignment:
    """Sort the [T, top_k] expert choices by local expert and pad each expert's run to `block_m` rows."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, top_k], got shape {tuple(topk_ids.shape)}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"need num_experts >= 1 and block_m >= 1, got {num_experts} and {block_m}")
    dev = topk_ids.device
    num_pairs = topk_ids.numel()
    local = topk_ids.reshape(-1).long() - expert_offset  # [P]
    key = torch.where((local >= 0) & (local < num_experts), local, num_experts)  # [P]; E = not local
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts[num_experts] = 0  # dropped pairs occupy no rows
    padded = (counts + block_m - 1) // block_m * block_m  # [E + 1]
    padded_end = torch.cumsum(padded, 0)  # [E + 1]
    order = torch.argsort(key, stable=True)  # [P], pairs grouped by expert
    sorted_key = key[order]
    rank_in_expert = torch.arange(num_pairs, device=dev) - _exclusive_cumsum(counts)[sorted_key]
    max_rows = max_padded_rows(num_pairs, num_experts, block_m)
    dest = torch.where(sorted_key < num_experts, (padded_end - padded)[sorted_key] + rank_in_expert, max_rows)
    sorted_ids = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)  # row max_rows collects the dropped pairs
    block_starts = torch.arange(0, max_rows, block_m, device=dev)  # [max_rows // block_m]
    block_expert = torch.searchsorted(padded_end[:num_experts], block_starts, right=True)
    return MoeAlignment(
        sorted_pair_ids=sorted_ids[:max_rows],
        block_expert_ids=block_expert.clamp(max=num_experts - 1).to(torch.int32),
        num_padded=padded_end[num_experts - 1 : num_experts].to(torch.int32),
        block_m=block_m,
        num_pairs=num_pairs,
    )
