"""Per-token-group FP8 activation quantization (Triton), as docs/k2-format.md (Block-FP8 checkpoint) has it.

[M, K] bf16/fp16/fp32 -> e4m3 [M, K] and float32 scales [M, ceil(K/128)], with
`scale = max(max|x|, eps) / 448` per token per group of 128 channels and `q = x / scale`.
The torch reference is `kernels.reference.per_token_group_quant_fp8_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2serve.kernels.block_fp8 import FP8_DTYPE, FP8_MAX
from k2serve.kernels.reference import AMAX_EPS, num_groups
from k2serve.kernels.triton_cast import cast_for_store, is_interpreter

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, EPS: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)  # [GROUP]
    mask = (rows < M)[:, None] & (cols < K)[None, :]  # [BLOCK_M, GROUP]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS) / FMAX  # [BLOCK_M]
    q = tl.clamp(x / scale[:, None], -FMAX, FMAX)  # [BLOCK_M, GROUP]
    q = cast_for_store(q, q_ptr.dtype.element_ty, INTERPRET)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + group, scale, mask=rows < M)


def _check_quant_args(x: torch.Tensor, group_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"per_token_group_quant_fp8 expects a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"activations must be one of {ACTIVATION_DTYPES}, got {x.dtype}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")


def _check_out(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a row-contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}"
        )


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128,
    out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token per group: [M, K] -> (e4m3 [M, K], float32 [M, ceil(K/group_size)]).

    The last group may be partial. `out` / `scale_out` may be given preallocated.
    """
    _check_quant_args(x, group_size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    g = num_groups(k, group_size)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device) if out is None else out
    s = torch.empty(m, g, dtype=torch.float32, device=x.device) if scale_out is None else scale_out
    _check_out("out", q, (m, k), FP8_DTYPE, x.device)
    _check_out("scale_out", s, (m, g), torch.float32, x.device)
    if m == 0:
        return q, s
    # Interpreter cost is per program and per op, not per element: fewer, taller tiles there.
    block_m = min(triton.next_power_of_2(m), 64 if is_interpreter() else 8)
    grid = (triton.cdiv(m, block_m), g)
    _per_token_group_quant_kernel[grid](
        x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
        GROUP=group_size, BLOCK_M=block_m, EPS=AMAX_EPS, FMAX=FP8_MAX, INTERPRET=is_interpreter(),
    )
    return q, s
