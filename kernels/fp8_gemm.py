"""Block-scaled W8A8 FP8 GEMM (Triton), as docs/k2-format.md (Block-FP8 checkpoint) has it.

`y[m, n] = sum_kb a_scale[m, kb] * w_scale[n // bn, kb] * sum_{k in chunk kb} a[m, k] * w[n, k]`:
e4m3 activations [M, K] with per-token-group scales [M, ceil(K/bk)], e4m3 weight [N, K] with block
scales [ceil(N/bn), ceil(K/bk)]; fp32 accumulation; partial blocks in M, N and K. The torch reference
is `kernels.reference.w8a8_block_fp8_matmul_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, FP8_DTYPE, block_scale_shape
from k2serve.kernels.fp8_quant import per_token_group_quant_fp8
from k2serve.kernels.reference import num_groups
from k2serve.kernels.triton_cast import cast_for_store, is_interpreter

OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# One small config under the interpreter (measured fastest for the test shapes).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 4}


@triton.jit
def block_scaled_dot(
    a_ptrs, w_ptrs, as_ptrs, ws_ptrs, m_ok, n_ok, offs_k, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The block-scaled K loop shared by the GEMM and the MoE kernels: fp32 [BLOCK_M, BLOCK_N] of
    sum_kb a_scale[m, kb] * w_scale[n, kb] * (a[m, chunk kb] . w[n, chunk kb])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
        w_s = tl.load(ws_ptrs + kb, mask=n_ok, other=0.0)
        if INTERPRET:  # numpy has no fp8 matmul
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _w8a8_block_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
    GROUP_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row blocks share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm  # [BLOCK_M]
    ws_ptrs = ws_ptr + (offs_n // GROUP_N) * stride_wsn  # [BLOCK_N]

    acc = block_scaled_dot(a_ptrs, w_ptrs, as_ptrs, ws_ptrs, m_ok, n_ok, offs_k, K,
                           BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET)

    c = cast_for_store(acc, c_ptr.dtype.element_ty, INTERPRET)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, c, mask=m_ok[:, None] & n_ok[None, :])


def _config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Decode (M <= 16) wants many narrow N tiles to spread the weight read over all SMs; prefill wants
# large square tiles for tensor-core throughput. `_prune_by_m` keeps the configs suited to the bucket.
GPU_CONFIGS = [
    _config(16, 32, 4, 4), _config(16, 64, 4, 4), _config(16, 128, 4, 3), _config(16, 64, 4, 6),
    _config(32, 64, 4, 4), _config(32, 128, 4, 3),
    _config(64, 64, 4, 4), _config(64, 128, 4, 3), _config(64, 128, 8, 4),
    _config(128, 64, 4, 4), _config(128, 128, 8, 3), _config(128, 128, 4, 4), _config(128, 256, 8, 3),
]


def _suits_m_bucket(block_m: int, m_bucket: int) -> bool:
    return max(16, min(64, m_bucket // 4)) <= block_m <= max(16, m_bucket)


def _prune_by_m(configs, named_args, **kwargs):
    m_bucket = named_args["M_BUCKET"]
    return [c for c in configs if _suits_m_bucket(c.kwargs["BLOCK_M"], m_bucket)]


_autotuned_gemm_kernel = triton.autotune(
    configs=GPU_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_by_m},
)(_w8a8_block_gemm_kernel)


def m_bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, capped so prefill sizes share one tuning."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _check_gemm_args(a_fp8, a_scale, w_fp8, w_scale, block, out_dtype) -> None:
    if a_fp8.dim() != 2 or w_fp8.dim() != 2:
        raise ValueError(f"expected a [M, K] and w [N, K], got {tuple(a_fp8.shape)} and {tuple(w_fp8.shape)}")
    if a_fp8.dtype != FP8_DTYPE or w_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"operands must be {FP8_DTYPE}, got a {a_fp8.dtype} and w {w_fp8.dtype}")
    (m, k), (n, kw) = a_fp8.shape, w_fp8.shape
    if k != kw:
        raise ValueError(f"inner dimensions differ: a has K={k}, w has K={kw}")
    bn, bk = block
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block K must be a power of two >= 16 (it is the kernel's K tile), got {bk}")
    expected = {"a_scale": (m, num_groups(k, bk)), "w_scale": block_scale_shape((n, k), block)}
    for name, t in (("a_scale", a_scale), ("w_scale", w_scale)):
        if tuple(t.shape) != expected[name] or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {expected[name]}, got {t.dtype} {tuple(t.shape)}")
    if out_dtype not in OUTPUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUTPUT_DTYPES}, got {out_dtype}")
    devices = {t.device for t in (a_fp8, a_scale, w_fp8, w_scale)}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {devices}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def w8a8_block_fp8_matmul(
    a_fp8: torch.Tensor, a_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: e4m3 a [M, K] (scales [M, ceil(K/bk)]) x e4m3 w [N, K]
    (scales [ceil(N/bn), ceil(K/bk)]) -> [M, N] in `out_dtype`, fp32 accumulation."""
    _check_gemm_args(a_fp8, a_scale, w_fp8, w_scale, block, out_dtype)
    a_fp8, a_scale, w_fp8, w_scale = map(_row_major, (a_fp8, a_scale, w_fp8, w_scale))
    (m, k), n = a_fp8.shape, w_fp8.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a_fp8.device) if out is None else out
    if tuple(c.shape) != (m, n) or c.dtype != out_dtype or c.stride(-1) != 1:
        raise ValueError(f"out must be row-contiguous {out_dtype} ({m}, {n}), got {c.dtype} {tuple(c.shape)}")
    if m == 0 or n == 0:
        return c
    args = (a_fp8, a_scale, w_fp8, w_scale, c, m, n, k, m_bucket(m),
            a_fp8.stride(0), a_scale.stride(0), w_fp8.stride(0), w_scale.stride(0), c.stride(0))
    fixed = {"GROUP_N": block[0], "BLOCK_K": block[1]}
    if is_interpreter():
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w8a8_block_gemm_kernel[grid](*args, **fixed, INTERPRET=True, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _autotuned_gemm_kernel[grid](*args, **fixed, INTERPRET=False)
    return c


def fp8_linear(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ W^T with W block-FP8: quantize x [.., K] per token group of bk, then the FP8 GEMM -> [.., N]
    in `out_dtype` (default x's dtype)."""
    if x.shape[-1] != weight_fp8.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight {tuple(weight_fp8.shape)} expects {weight_fp8.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    q, s = per_token_group_quant_fp8(x2, block[1])
    y = w8a8_block_fp8_matmul(q, s, weight_fp8, weight_scale_inv, block, out_dtype or x.dtype)  # [M, N]
    return y.reshape(*x.shape[:-1], weight_fp8.shape[0])
