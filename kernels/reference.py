"""Torch references for the FP8 kernels (no Triton needed): the CPU backend and the kernel tests use them.

Each reference mirrors its kernel's rounding steps (docs/k2-format.md): activations are quantized per
token per group of 128 channels with `scale = max|x| / 448`, GEMMs accumulate in fp32 and apply
`a_scale[row, kb] * w_scale[n // 128, kb]`. The `*_error_bound` functions give rigorous element-wise
bounds that tests and the GPU benchmark check kernels against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, FP8_DTYPE, FP8_MAX, dequantize_block_fp8

# Keeps an all-zero group's scale positive (vLLM and SGLang use the same floor).
AMAX_EPS = 1e-10
# Round-to-nearest e4m3 (3 mantissa bits): relative error <= 2^-4 for normal values; below the
# smallest normal (2^-6) the grid step is 2^-9, so the absolute error is <= 2^-10 (times the scale).
E4M3_REL_ERR = 2.0**-4
E4M3_SUBNORMAL_ABS_ERR = 2.0**-10
# Unit roundoff of the output dtypes (half an ulp, relative).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def per_token_group_quant_fp8_ref(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K/group_size)]); the last group may be partial."""
    m, k = x.shape
    g = num_groups(k, group_size)
    padded = torch.zeros(m, g * group_size, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    groups = padded.view(m, g, group_size)  # [M, G, group]
    scales = groups.abs().amax(dim=-1).clamp(min=AMAX_EPS) / FP8_MAX  # [M, G]
    q = (groups / scales[:, :, None]).clamp(-FP8_MAX, FP8_MAX).view(m, -1)[:, :k]
    return q.to(FP8_DTYPE).contiguous(), scales


def dequantize_activation_ref(x_fp8: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of `per_token_group_quant_fp8_ref`, in float32: [M, K]."""
    k = x_fp8.shape[1]
    return x_fp8.float() * scales.repeat_interleave(group_size, dim=1)[:, :k]


def w8a8_block_fp8_matmul_ref(
    a_fp8: torch.Tensor, a_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp32 product of the dequantized operands: [M, K] x [N, K]^T -> [M, N] in `out_dtype`."""
    a = dequantize_activation_ref(a_fp8, a_scale, block[1])  # [M, K]
    w = dequantize_block_fp8(w_fp8, w_scale, block)  # [N, K]
    return (a @ w.T).to(out_dtype)


def fp8_linear_ref(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> torch.Tensor:
    """What `fp8_linear` computes: quantize x per token group, then the block-scaled GEMM; [.., K] -> [.., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = per_token_group_quant_fp8_ref(x2, block[1])
    y = w8a8_block_fp8_matmul_ref(q, s, weight_fp8, weight_scale_inv, block, x.dtype)
    return y.reshape(*x.shape[:-1], weight_fp8.shape[0])


def dequant_linear_ref(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Dequantize the weight to x's dtype and multiply (no activation quantization): [.., K] -> [.., N]."""
    w = dequantize_block_fp8(weight_fp8, weight_scale_inv, block, dtype=x.dtype)  # [N, K]
    return F.linear(x, w)


def split_w13_scale(w13_scale: torch.Tensor, intermediate: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A w13 scale grid is the gate's grid stacked on the up's: [.., 2*ceil(I/bn), kb] -> two halves."""
    n_gate = num_groups(intermediate, block_n)
    return w13_scale[..., :n_gate, :], w13_scale[..., n_gate:, :]


def dequantize_w13(w13_fp8: torch.Tensor, w13_scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    """One expert's fused gate+up weight [2I, H] (gate rows first) -> dense [2I, H]."""
    inter = w13_fp8.shape[0] // 2
    gate_s, up_s = split_w13_scale(w13_scale, inter, block[0])
    gate = dequantize_block_fp8(w13_fp8[:inter], gate_s, block, dtype)
    up = dequantize_block_fp8(w13_fp8[inter:], up_s, block, dtype)
    return torch.cat([gate, up], dim=0)


def _quant_roundtrip(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_activation_ref(*per_token_group_quant_fp8_ref(x, group_size), group_size)


def _expert_forward(x, w13, w2, quantize: bool, group: int) -> torch.Tensor:
    """One expert on its tokens: [n, H] -> [n, H] (float32 when quantizing, as the kernels accumulate)."""
    if quantize:
        h = (_quant_roundtrip(x, group) @ w13.T).to(x.dtype).float()  # [n, 2I], stored in x.dtype
    else:
        h = x @ w13.T  # [n, 2I]
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up  # [n, I]
    if quantize:
        return _quant_roundtrip(act, group) @ w2.T
    return act @ w2.T


def fused_moe_ref(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    w13_fp8: torch.Tensor, w13_scale: torch.Tensor, w2_fp8: torch.Tensor, w2_scale: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK, expert_offset: int = 0, quantize_activations: bool = True,
) -> torch.Tensor:
    """Routed experts, one expert at a time: [T, H] -> [T, H] in x's dtype.

    Expert `topk_ids - expert_offset` outside [0, E) contributes nothing (expert parallelism).
    With `quantize_activations` the math mirrors `fused_moe` (fp8 activations, fp32 accumulation);
    without, weights are dequantized to x's dtype and multiplied directly (the CPU backend).
    """
    t, k = topk_ids.shape
    local = topk_ids.long() - expert_offset  # [T, k]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    compute = torch.float32 if quantize_activations else x.dtype
    for e in torch.unique(local[(local >= 0) & (local < w13_fp8.shape[0])]).tolist():
        tok, slot = (local == e).nonzero(as_tuple=True)
        w13 = dequantize_w13(w13_fp8[e], w13_scale[e], block, compute)  # [2I, H]
        w2 = dequantize_block_fp8(w2_fp8[e], w2_scale[e], block, compute)  # [H, I]
        y = _expert_forward(x[tok], w13, w2, quantize_activations, block[1])  # [n, H]
        y = (y.float() * topk_weights[tok, slot].float()[:, None]).to(x.dtype)
        out.index_add_(0, tok, y.float())
    return out.to(x.dtype)


def fp8_linear_error_bound(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, group_size: int = 128
) -> torch.Tensor:
    """Element-wise bound on |fp8_linear(x) - x @ weight.T| for a dense fp32 weight [N, K]: [M, N].

    Quantizing x moves each element by <= 2^-4 |x| (normal range) or 2^-10 * scale (subnormal range),
    so the product moves by at most sum_k |w| * that; add fp32 accumulation (K * 2^-24 * |x|@|w|)
    and the final rounding to `out_dtype`.
    """
    xf, wf = x.float(), weight.float()
    _, scales = per_token_group_quant_fp8_ref(xf, group_size)
    sub = scales.repeat_interleave(group_size, dim=1)[:, : xf.shape[1]] * E4M3_SUBNORMAL_ABS_ERR
    x_err = E4M3_REL_ERR * xf.abs() + sub  # [M, K]
    accum = 2 * (xf.shape[1] + 2) * 2.0**-24 * (xf.abs() @ wf.abs().T)  # [M, N]
    before_rounding = x_err @ wf.abs().T + accum
    return before_rounding + UNIT_ROUNDOFF[out_dtype] * ((xf @ wf.T).abs() + before_rounding) + 1e-30


def gemm_error_bound(
    a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, accumulation_error: float | None = None
) -> torch.Tensor:
    """Element-wise bound on a kernel's deviation from the fp32 product of the same dequantized
    operands a [M, K], w [N, K]: accumulation error relative to |a|@|w| (default 2 * (K + 2) * 2^-24,
    fp32 summation in any order, doubled for the per-chunk scaling) plus the final rounding to
    `out_dtype`: [M, N]. Hopper's FP8 tensor cores keep fewer accumulator bits inside one 128-wide
    chunk; GPU checks pass a larger `accumulation_error` for that."""
    rel = 2 * (a.shape[1] + 2) * 2.0**-24 if accumulation_error is None else accumulation_error
    accum = rel * (a.float().abs() @ w.float().abs().T)  # [M, N]
    exact = a.float() @ w.float().T  # [M, N]
    return accum + UNIT_ROUNDOFF[out_dtype] * (exact.abs() + accum) + 1e-30
