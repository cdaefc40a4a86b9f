"""Random block-FP8 weights and routing for kernel tests and benchmarks (deterministic per seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.block_fp8 import DEFAULT_BLOCK, quantize_block_fp8


@dataclass(frozen=True)
class MoeWeights:
    """Experts in the fused layout of `kernels.fused_moe`: w13 [E, 2I, H], w2 [E, H, I] and their scales."""

    w13_fp8: torch.Tensor
    w13_scale: torch.Tensor
    w2_fp8: torch.Tensor
    w2_scale: torch.Tensor

    def as_args(self) -> tuple[torch.Tensor, ...]:
        return (self.w13_fp8, self.w13_scale, self.w2_fp8, self.w2_scale)


def random_block_fp8(n: int, k: int, gen: torch.Generator, block=DEFAULT_BLOCK, device="cpu"):
    """A [n, k] weight with variance-preserving scale (std k^-0.5), quantized: (e4m3, scale_inv)."""
    w = torch.randn(n, k, generator=gen) * k**-0.5
    q, s = quantize_block_fp8(w, block)
    return q.to(device), s.to(device)


def random_moe_weights(num_experts: int, hidden: int, inter: int, seed: int = 0, block=DEFAULT_BLOCK,
                       device="cpu") -> MoeWeights:
    """Each expert's gate and up quantized separately and stacked (gate rows first), as the loader does."""
    gen = torch.Generator().manual_seed(seed)
    w13, w13_s, w2, w2_s = [], [], [], []
    for _ in range(num_experts):
        (gq, gs), (uq, us) = (random_block_fp8(inter, hidden, gen, block) for _ in range(2))
        dq, ds = random_block_fp8(hidden, inter, gen, block)
        w13.append(torch.cat([gq, uq]))
        w13_s.append(torch.cat([gs, us]))
        w2.append(dq)
        w2_s.append(ds)
    return MoeWeights(*(torch.stack(t).to(device) for t in (w13, w13_s, w2, w2_s)))


def random_routing(num_tokens: int, top_k: int, num_ids: int, seed: int = 0, device="cpu"):
    """Distinct expert ids per token (like a top-k) in [0, num_ids) and float32 weights: ([T, k], [T, k])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, num_ids, generator=gen).argsort(dim=1)[:, :top_k]
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return ids.to(device), weights.to(device)
