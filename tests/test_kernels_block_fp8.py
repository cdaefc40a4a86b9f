"""slice_block_fp8: tensor-parallel shards of block-FP8 matrices, exact when block-aligned."""

import pytest
import torch

from k2serve.kernels.block_fp8 import FP8_DTYPE, block_scale_shape, dequantize_block_fp8, quantize_block_fp8, slice_block_fp8


def _weight(n: int, k: int):
    return quantize_block_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)))


@pytest.mark.parametrize("rows,cols", [(slice(128, 300), slice(None)), (slice(None), slice(256, 333)), (slice(0, 128), slice(128, 256))])
def test_aligned_shards_keep_bytes_and_scales(rows, cols):
    q, s = _weight(300, 333)
    q_shard, s_shard = slice_block_fp8(q, s, rows, cols)
    assert torch.equal(q_shard.view(torch.uint8), q[rows, cols].view(torch.uint8))
    assert s_shard.shape == block_scale_shape(tuple(q_shard.shape))
    assert torch.equal(dequantize_block_fp8(q_shard, s_shard), dequantize_block_fp8(q, s)[rows, cols])


def test_unaligned_shard_is_requantized_within_one_rounding():
    # e.g. the tiny model's q_b_proj (192 rows) split over 2 ranks: rows 96..192 start mid-block.
    q, s = _weight(192, 96)
    q_shard, s_shard = slice_block_fp8(q, s, slice(96, 192))
    assert q_shard.dtype == FP8_DTYPE and s_shard.shape == (1, 1)
    want = dequantize_block_fp8(q, s)[96:]
    got = dequantize_block_fp8(q_shard, s_shard)
    # one more round-to-nearest e4m3: <= 2^-4 relative, plus half the subnormal step (2^-10) of the new scale
    assert ((got - want).abs() <= want.abs() / 16 + s_shard.max() * 2.0**-10).all()


def test_rejects_strided_slices():
    q, s = _weight(128, 128)
    with pytest.raises(ValueError, match="contiguous slices"):
        slice_block_fp8(q, s, slice(0, 128, 2))
