"""Block-FP8 weights as K2 stores them: e4m3 data plus one float32 multiplier per 128x128 block.

`W[i, j] = W_fp8[i, j] * scale_inv[i // bn, j // bk]` (docs/k2-format.md); edge blocks may be partial.
These are the torch references that the loader, the tiny-checkpoint writer and the kernels share.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


def block_scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the scale grid for a [rows, cols] matrix: [ceil(rows/bn), ceil(cols/bk)]."""
    rows, cols = shape
    bn, bk = block
    return (-(-rows // bn), -(-cols // bk))


def expand_block_scales(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Repeat each block's scale over its block and crop to the matrix shape."""
    bn, bk = block
    full = scale_inv.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_block_fp8(
    weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """e4m3 [N, K] with float32 scales [ceil(N/bn), ceil(K/bk)] -> dense [N, K] in `dtype`."""
    if weight_fp8.dim() != 2:
        raise ValueError(f"block-FP8 weights are 2-D, got shape {tuple(weight_fp8.shape)}")
    expected = block_scale_shape(tuple(weight_fp8.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight_fp8.shape)} "
            f"with block {block}: expected {expected}"
        )
    scales = expand_block_scales(scale_inv.float(), tuple(weight_fp8.shape), block)
    return (weight_fp8.float() * scales).to(dtype)


def quantize_block_fp8(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (e4m3 [N, K], float32 scale_inv [ceil(N/bn), ceil(K/bk)]) with amax/448 per block."""
    if weight.dim() != 2:
        raise ValueError(f"block-FP8 weights are 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    bn, bk = block
    n_rb, n_cb = block_scale_shape((rows, cols), block)
    padded = torch.zeros(n_rb * bn, n_cb * bk, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(n_rb, bn, n_cb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [n_rb, n_cb]
    scale_inv = amax / FP8_MAX
    scaled = blocks / scale_inv[:, None, :, None]
    q = scaled.clamp(-FP8_MAX, FP8_MAX).view(n_rb * bn, n_cb * bk)[:rows, :cols].to(FP8_DTYPE)
    return q.contiguous(), scale_inv.float().contiguous()


def slice_block_fp8(
    weight_fp8: torch.Tensor, scale_inv: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None),
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, cols] slice of a block-FP8 matrix as a block-FP8 matrix whose blocks start at the slice.

    A tensor-parallel shard whose first row and column fall on block boundaries keeps the stored bytes
    and scales exactly (its last block may be partial). Otherwise the slice is dequantized and
    quantized again, which rounds each value once more (relative error <= 2^-4 in the normal range).
    """
    n, k = weight_fp8.shape
    r0, r1, r_step = rows.indices(n)
    c0, c1, c_step = cols.indices(k)
    if r_step != 1 or c_step != 1:
        raise ValueError(f"only contiguous slices of a block-FP8 matrix are supported, got {rows} and {cols}")
    bn, bk = block
    if r0 % bn == 0 and c0 % bk == 0:
        q = weight_fp8[r0:r1, c0:c1]
        s = scale_inv[r0 // bn : -(-r1 // bn), c0 // bk : -(-c1 // bk)]
        return q.contiguous(), s.contiguous()
    dense = dequantize_block_fp8(weight_fp8, scale_inv, block)[r0:r1, c0:c1]
    return quantize_block_fp8(dense, block)
