"""Fused MoE experts with block-FP8 weights (Triton).

Weights come in the fused layout of `kernels.moe_weights` (w13 = gate rows then up rows, [E, 2I, H],
with the gate's and the up's scale grids stacked; w2 [E, H, I]); `stack_experts` builds it.
Steps: align pairs to experts (`moe_align`), quantize x per token group, grouped GEMM x @ w13^T,
SiLU(gate) * up fused with FP8 quantization, grouped GEMM @ w2^T times the router weight, then the
top_k results of each token are summed. The torch reference is `kernels.reference.fused_moe_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, FP8_DTYPE, FP8_MAX
from k2serve.kernels.fp8_gemm import block_scaled_dot
from k2serve.kernels.fp8_quant import ACTIVATION_DTYPES, per_token_group_quant_fp8
from k2serve.kernels.moe_align import MoeAlignment, align_tokens_to_experts
from k2serve.kernels.reference import AMAX_EPS, num_groups
from k2serve.kernels.triton_cast import cast_for_store, is_interpreter


@dataclass(frozen=True)
class MoeKernelConfig:
    """Tile shape of the grouped GEMMs; BLOCK_M is also the alignment padding."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


def moe_kernel_config(num_pairs: int, num_experts: int) -> MoeKernelConfig:
    """Heuristic tiles by tokens per expert: decode has a handful per expert (small BLOCK_M wastes
    less padding), prefill hundreds (large tiles for tensor-core throughput)."""
    if is_interpreter():
        return MoeKernelConfig(block_m=16, block_n=64)
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 8:
        return MoeKernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return MoeKernelConfig(block_m=32, block_n=128, num_warps=4, num_stages=3)
    return MoeKernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, topk_w_ptr,
    num_pairs, N, K, SPLIT_N, N_FIRST_SROWS,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
    TOP_K: tl.constexpr, GROUP_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_BY_POSITION: tl.constexpr, C_BY_PAIR: tl.constexpr, MUL_WEIGHT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of one expert's rows. A rows are token `pair // TOP_K` (first GEMM)
    or the sorted position (second); C rows are the sorted position (first) or the pair (second)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's padded rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted positions
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BLOCK_M]; num_pairs marks padding
    row_ok = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if A_BY_POSITION:
        a_row = offs_m.to(tl.int64)
    else:
        a_row = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # w13's scale grid is the gate's grid stacked on the up's, so the up half restarts its block rows.
    srow = tl.where(offs_n < SPLIT_N, offs_n // GROUP_N, N_FIRST_SROWS + (offs_n - SPLIT_N) // GROUP_N)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    as_ptrs = as_ptr + a_row * stride_asm  # [BLOCK_M]
    ws_ptrs = ws_ptr + expert * stride_wse + srow * stride_wsn  # [BLOCK_N]

    acc = block_scaled_dot(a_ptrs, w_ptrs, as_ptrs, ws_ptrs, row_ok, n_ok, offs_k, K,
                           BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET)

    if MUL_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c = cast_for_store(acc, c_ptr.dtype.element_ty, INTERPRET)
    if C_BY_PAIR:
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c, mask=row_ok[:, None] & n_ok[None, :])
    else:
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c, mask=n_ok[None, :])


@triton.jit
def _silu_mul_quant_kernel(
    h_ptr, q_ptr, s_ptr, num_padded_ptr, INTER, stride_hm, stride_qm, stride_sm,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, EPS: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    """act = silu(h[:, :I]) * h[:, I:], quantized per row per group of GROUP channels."""
    num_rows = tl.load(num_padded_ptr)
    if tl.program_id(0) * BLOCK_M >= num_rows:
        return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)  # [GROUP]
    mask = (rows < num_rows)[:, None] & (cols < INTER)[None, :]
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, GROUP]
    up = tl.load(h_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    scale = tl.maximum(tl.max(tl.abs(act), axis=1), EPS) / FMAX  # [BLOCK_M]
    q = cast_for_store(tl.clamp(act / scale[:, None], -FMAX, FMAX), q_ptr.dtype.element_ty, INTERPRET)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + tl.program_id(1), scale, mask=rows < num_rows)


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} of shape {shape}, got {t.dtype} {tuple(t.shape)}")


def _check_moe_args(x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale, block) -> None:
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be [T, H] in one of {ACTIVATION_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if w13_fp8.dim() != 3 or w2_fp8.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13_fp8.shape)} and {tuple(w2_fp8.shape)}")
    (t, h), (e, two_i, _), (bn, bk) = x.shape, w13_fp8.shape, block
    if two_i % 2:
        raise ValueError(f"w13 stacks gate and up rows, so its row count must be even, got {two_i}")
    inter = two_i // 2
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T={t}, top_k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    _expect("topk_weights", topk_weights, tuple(topk_ids.shape), (torch.float32,))
    _expect("w13_fp8", w13_fp8, (e, two_i, h), (FP8_DTYPE,))
    _expect("w2_fp8", w2_fp8, (e, h, inter), (FP8_DTYPE,))
    _expect("w13_scale", w13_scale, (e, 2 * num_groups(inter, bn), num_groups(h, bk)), (torch.float32,))
    _expect("w2_scale", w2_scale, (e, num_groups(h, bn), num_groups(inter, bk)), (torch.float32,))
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block K must be a power of two >= 16 (it is the kernel's K tile), got {bk}")


def _grouped_gemm(a, a_scale, w, w_scale, c, align: MoeAlignment, topk_weights, top_k, block, cfg, *,
                  split_n: int, a_by_position: bool) -> None:
    """Launch `_moe_gemm_kernel` over every (block of sorted rows, N tile); idle blocks exit at once."""
    n, k = w.shape[1], w.shape[2]
    grid = (triton.cdiv(align.max_rows, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, a_scale, w, w_scale, c, align.sorted_pair_ids, align.block_expert_ids, align.num_padded,
        topk_weights, align.num_pairs, n, k, split_n, num_groups(split_n, block[0]),
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), c.stride(0),
        TOP_K=top_k, GROUP_N=block[0], BLOCK_K=block[1],
        A_BY_POSITION=a_by_position, C_BY_PAIR=a_by_position, MUL_WEIGHT=a_by_position,
        INTERPRET=is_interpreter(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _silu_mul_quant(h: torch.Tensor, align: MoeAlignment, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, 2I] -> e4m3 [rows, I] and scales [rows, ceil(I/group)] for the first num_padded rows."""
    rows, inter = h.shape[0], h.shape[1] // 2
    q = torch.empty(rows, inter, dtype=FP8_DTYPE, device=h.device)
    s = torch.empty(rows, num_groups(inter, group), dtype=torch.float32, device=h.device)
    block_m = 64 if is_interpreter() else 8  # the interpreter pays per program, not per element
    grid = (triton.cdiv(rows, block_m), s.shape[1])
    _silu_mul_quant_kernel[grid](
        h, q, s, align.num_padded, inter, h.stride(0), q.stride(0), s.stride(0),
        GROUP=group, BLOCK_M=block_m, EPS=AMAX_EPS, FMAX=FP8_MAX, INTERPRET=is_interpreter(),
    )
    return q, s


def fused_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    w13_fp8: torch.Tensor, w13_scale: torch.Tensor, w2_fp8: torch.Tensor, w2_scale: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK, expert_offset: int = 0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) -> [T, H] in x's dtype.

    Expert ids are global; `topk_ids - expert_offset` outside [0, E) (experts of other ranks) are
    skipped. Weight layout: `kernels.moe_weights`.
    """
    _check_moe_args(x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale, block)
    (t, hidden), top_k, num_experts = x.shape, topk_ids.shape[1], w13_fp8.shape[0]
    res = torch.empty_like(x) if out is None else out
    _expect("out", res, tuple(x.shape), (x.dtype,))
    if t == 0 or top_k == 0:
        return res.zero_()
    x, w13_fp8, w13_scale, w2_fp8, w2_scale = (v.contiguous() for v in (x, w13_fp8, w13_scale, w2_fp8, w2_scale))
    cfg = moe_kernel_config(t * top_k, num_experts)
    align = align_tokens_to_experts(topk_ids, num_experts, cfg.block_m, expert_offset)
    xq, xs = per_token_group_quant_fp8(x, block[1])  # [T, H], [T, H/bk]
    weights = topk_weights.contiguous().reshape(-1)  # [T * top_k]
    h = torch.empty(align.max_rows, w13_fp8.shape[1], dtype=x.dtype, device=x.device)  # [rows, 2I]
    inter = w13_fp8.shape[1] // 2
    _grouped_gemm(xq, xs, w13_fp8, w13_scale, h, align, weights, top_k, block, cfg, split_n=inter, a_by_position=False)
    aq, a_s = _silu_mul_quant(h, align, block[1])  # [rows, I], [rows, I/bk]
    y = torch.zeros(t * top_k, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]; skipped pairs stay 0
    _grouped_gemm(aq, a_s, w2_fp8, w2_scale, y, align, weights, top_k, block, cfg, split_n=hidden, a_by_position=True)
    res.copy_(y.view(t, top_k, hidden).sum(dim=1, dtype=torch.float32))
    return res
