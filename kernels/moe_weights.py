"""MoeWeights: a rank's routed experts in the fused layout that `Fp8Backend.moe_experts` takes.

* `w13_fp8` [E, 2I, H] e4m3: each expert's gate_proj rows, then its up_proj rows.
* `w13_scale` [E, 2*ceil(I/bn), ceil(H/bk)] float32: the gate's scale grid stacked on the up's
  (equal to [E, ceil(2I/bn), ..] when I % bn == 0, as for K2's I = 2048).
* `w2_fp8` [E, H, I] e4m3 (down_proj) with `w2_scale` [E, ceil(H/bn), ceil(I/bk)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8Matrix = tuple[torch.Tensor, torch.Tensor]  # (e4m3 weight, float32 scale_inv) as the checkpoint stores it


@dataclass(frozen=True)
class MoeWeights:
    """Experts in the fused layout (see the module docstring)."""

    w13_fp8: torch.Tensor
    w13_scale: torch.Tensor
    w2_fp8: torch.Tensor
    w2_scale: torch.Tensor

    def as_args(self) -> tuple[torch.Tensor, ...]:
        """(w13_fp8, w13_scale, w2_fp8, w2_scale), the order `moe_experts` takes them in."""
        return (self.w13_fp8, self.w13_scale, self.w2_fp8, self.w2_scale)

    @property
    def num_experts(self) -> int:
        return self.w13_fp8.shape[0]

    def shard(self, first: int, count: int) -> "MoeWeights":
        """Experts [first, first + count): one expert-parallel rank's share (views, no copy)."""
        return MoeWeights(*(t[first : first + count] for t in self.as_args()))


def stack_experts(gate: list[FP8Matrix], up: list[FP8Matrix], down: list[FP8Matrix]) -> MoeWeights:
    """Per-expert checkpoint matrices (gate_proj, up_proj, down_proj; each (e4m3, scale_inv)) -> MoeWeights."""
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError(f"need the same non-zero number of gate, up and down matrices, got {len(gate)}, {len(up)}, {len(down)}")
    return MoeWeights(
        torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)]),  # [E, 2I, H]
        torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)]),  # [E, 2*ceil(I/bn), ceil(H/bk)]
        torch.stack([d[0] for d in down]),  # [E, H, I]
        torch.stack([d[1] for d in down]),  # [E, ceil(H/bn), ceil(I/bk)]
    )
