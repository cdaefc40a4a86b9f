"""Random block-FP8 weights and routing for kernel tests and benchmarks (deterministic per seed)."""

from __future__ import annotations

import torch

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, quantize_block_fp8
from k2serve.kernels.moe_weights import MoeWeights, stack_experts


def random_block_fp8(n: int, k: int, gen: torch.Generator, block=DEFAULT_BLOCK, device="cpu"):
    """A [n, k] weight with variance-preserving scale (std k^-0.5), quantized: (e4m3, scale_inv)."""
    w = torch.randn(n, k, generator=gen) * k**-0.5
    q, s = quantize_block_fp8(w, block)
    return q.to(device), s.to(device)


def random_moe_weights(num_experts: int, hidden: int, inter: int, seed: int = 0, block=DEFAULT_BLOCK,
                       device="cpu") -> MoeWeights:
    """Each expert's gate and up quantized separately and stacked (gate rows first), as the loader does."""
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = [], [], []
    for _ in range(num_experts):
        gate.append(random_block_fp8(inter, hidden, gen, block))
        up.append(random_block_fp8(inter, hidden, gen, block))
        down.append(random_block_fp8(hidden, inter, gen, block))
    return MoeWeights(*(t.to(device) for t in stack_experts(gate, up, down).as_args()))


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
    def weight(rows, cols, e, i):
        return random_fp8_weight(rows, cols, device, seed * 7919 + 3 * e + i, block)

    return stack_experts([weight(inter, hidden, e, 0) for e in range(num_experts)],
                         [weight(inter, hidden, e, 1) for e in range(num_experts)],
                         [weight(hidden, inter, e, 2) for e in range(num_experts)])


def random_paged_cache(seq_lens: list[int], block_size: int, width: int, seed: int = 0, dtype=torch.float32,
                       spare_blocks: int = 3, kv_scale: float = 1.0):
    """A latent cache [N, block_size, width] in `dtype` (FP8 stores value / kv_scale) with random entries, and
    block tables (lists) giving each sequence of `seq_lens` tokens its own blocks in shuffled order."""
    from k2serve.kernels.latent_cache import quantize

    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    cache = quantize(torch.randn(num_blocks, block_size, width, generator=gen), dtype, kv_scale)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used: used + n])
        used += n
    return cache, tables
