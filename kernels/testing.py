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


def random_fp8_weight(n: int, k: int, device, seed: int = 0, block=DEFAULT_BLOCK):
    """A random block-FP8 weight built directly on `device` (fast at K2 sizes): e4m3 [n, k] spanning the
    format's range and scales [ceil(n/bn), ceil(k/bk)] around (3 / 448) * k^-0.5 (std about k^-0.5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = (torch.randn(n, k, device=device, generator=gen) * (448 / 3)).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (-(-n // block[0]), -(-k // block[1]))
    scale = (0.5 + torch.rand(grid, device=device, generator=gen)) * (3 / 448) * k**-0.5
    return q, scale.float()


def random_fp8_experts(num_experts: int, hidden: int, inter: int, device, seed: int = 0, block=DEFAULT_BLOCK):
    """`random_fp8_weight` for every expert, in the fused layout (gate and up scale grids stacked)."""
    parts = [[random_fp8_weight(rows, cols, device, seed * 7919 + 3 * e + i, block)
              for i, (rows, cols) in enumerate(((inter, hidden), (inter, hidden), (hidden, inter)))]
             for e in range(num_experts)]
    return MoeWeights(
        torch.stack([torch.cat([g[0], u[0]]) for g, u, _ in parts]),
        torch.stack([torch.cat([g[1], u[1]]) for g, u, _ in parts]),
        torch.stack([d[0] for _, _, d in parts]),
        torch.stack([d[1] for _, _, d in parts]),
    )
