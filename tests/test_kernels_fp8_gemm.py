"""Block-scaled W8A8 FP8 GEMM and fp8_linear vs their torch references (Triton interpreter on CPU)."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from k2serve.kernels.block_fp8 import FP8_DTYPE, dequantize_block_fp8  # noqa: E402
from k2serve.kernels.fp8_gemm import (  # noqa: E402
    GPU_CONFIGS, _suits_m_bucket, fp8_linear, m_bucket, w8a8_block_fp8_matmul,
)
from k2serve.kernels.reference import (  # noqa: E402
    dequantize_activation_ref, fp8_linear_error_bound, gemm_error_bound, per_token_group_quant_fp8_ref,
    w8a8_block_fp8_matmul_ref,
)
from k2serve.kernels.testing import random_block_fp8  # noqa: E402

# (M, N, K): M = 1 (decode), partial blocks in N (200, 130) and K (333, 260), several M tiles (70),
# several full N tiles (256).
SHAPES = [(1, 64, 128), (1, 200, 333), (5, 130, 260), (70, 96, 200), (17, 256, 128)]


def _operands(m, n, k, block=(128, 128), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w_fp8, w_scale = random_block_fp8(n, k, gen, block)
    return x, w_fp8, w_scale


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gemm_matches_reference_within_accumulation_error(m, n, k, out_dtype):
    # Same fp8 operands and scales as the reference: the products of two e4m3 values are exact in
    # fp32, so only the summation order (<= ~2K * 2^-24 relative to |a|@|w|) and the final rounding
    # to out_dtype (half an ulp) can differ. `gemm_error_bound` is that bound, element by element.
    x, w_fp8, w_scale = _operands(m, n, k)
    a_fp8, a_scale = per_token_group_quant_fp8_ref(x)
    out = torch.full((m, n), float("nan"), dtype=out_dtype)
    y = w8a8_block_fp8_matmul(a_fp8, a_scale, w_fp8, w_scale, out_dtype=out_dtype, out=out)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any(), "an output element was not written"
    ref = w8a8_block_fp8_matmul_ref(a_fp8, a_scale, w_fp8, w_scale, out_dtype=torch.float32)
    bound = gemm_error_bound(dequantize_activation_ref(a_fp8, a_scale), dequantize_block_fp8(w_fp8, w_scale), out_dtype)
    assert ((y.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize("m,n,k", SHAPES[1:3])
def test_fp8_linear_error_is_bounded_by_activation_rounding(m, n, k):
    # Against the unquantized product x @ W^T (W already exact in both): quantizing x moves each element
    # by <= 2^-4 |x| (+ 2^-10 * scale in the subnormal range); see `fp8_linear_error_bound`.
    x, w_fp8, w_scale = _operands(m, n, k, seed=1)
    w = dequantize_block_fp8(w_fp8, w_scale)
    y = fp8_linear(x.view(1, m, k), w_fp8, w_scale)  # leading dims are kept
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    err = (y[0].float() - x.float() @ w.T).abs()
    assert (err <= fp8_linear_error_bound(x, w, torch.bfloat16)).all()


def test_smaller_weight_blocks():
    block = (64, 64)
    x, w_fp8, w_scale = _operands(3, 150, 200, block=block, seed=2)
    a_fp8, a_scale = per_token_group_quant_fp8_ref(x, 64)
    y = w8a8_block_fp8_matmul(a_fp8, a_scale, w_fp8, w_scale, block=block, out_dtype=torch.float32)
    ref = w8a8_block_fp8_matmul_ref(a_fp8, a_scale, w_fp8, w_scale, block=block, out_dtype=torch.float32)
    bound = gemm_error_bound(dequantize_activation_ref(a_fp8, a_scale, 64), dequantize_block_fp8(w_fp8, w_scale, block),
                             torch.float32)
    assert ((y - ref).abs() <= bound).all()


def test_every_m_bucket_keeps_a_gpu_config():
    # The autotuner prunes by M bucket; decode buckets must keep BLOCK_M = 16 and prefill large tiles.
    for m in (1, 2, 8, 16, 17, 64, 100, 256, 1000, 4096, 100_000):
        kept = [c.kwargs["BLOCK_M"] for c in GPU_CONFIGS if _suits_m_bucket(c.kwargs["BLOCK_M"], m_bucket(m))]
        assert kept, f"no config for M={m}"
    assert {c.kwargs["BLOCK_M"] for c in GPU_CONFIGS if _suits_m_bucket(c.kwargs["BLOCK_M"], m_bucket(1))} == {16}
    assert min(c.kwargs["BLOCK_M"] for c in GPU_CONFIGS if _suits_m_bucket(c.kwargs["BLOCK_M"], m_bucket(4096))) >= 64


def test_rejects_bad_arguments():
    x, w_fp8, w_scale = _operands(2, 64, 128)
    a_fp8, a_scale = per_token_group_quant_fp8_ref(x)
    with pytest.raises(TypeError, match="operands must be"):
        w8a8_block_fp8_matmul(x, a_scale, w_fp8, w_scale)
    with pytest.raises(ValueError, match="inner dimensions"):
        w8a8_block_fp8_matmul(a_fp8[:, :64], a_scale, w_fp8, w_scale)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        w8a8_block_fp8_matmul(a_fp8, a_scale, w_fp8, w_scale.T.contiguous().repeat(1, 2))
    with pytest.raises(TypeError, match="out_dtype"):
        w8a8_block_fp8_matmul(a_fp8, a_scale, w_fp8, w_scale, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.zeros(2, 100), w_fp8, w_scale)
    assert w_fp8.dtype == FP8_DTYPE
