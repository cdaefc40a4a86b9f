"""Per-token-group FP8 quantization kernel vs its torch reference (Triton interpreter on CPU)."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from k2serve.kernels.block_fp8 import FP8_DTYPE  # noqa: E402
from k2serve.kernels.fp8_quant import per_token_group_quant_fp8  # noqa: E402
from k2serve.kernels.reference import (  # noqa: E402
    AMAX_EPS, E4M3_REL_ERR, E4M3_SUBNORMAL_ABS_ERR, dequantize_activation_ref, per_token_group_quant_fp8_ref,
)

# (M, K): M = 1, partial last groups (7, 200, 333), exact groups (128, 256), several row tiles (70).
SHAPES = [(1, 7), (1, 128), (3, 200), (9, 333), (16, 256), (70, 130)]


def _activations(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=gen)]
    if m > 2:
        x[1, :] = 0.0  # an all-zero token: the eps floor must keep its scale positive
    return x.to(dtype)


def _poisoned(m: int, k: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.full((m, k), float("nan")).to(FP8_DTYPE)
    return q, torch.full((m, groups), float("nan"))


@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference_bit_for_bit(m, k, dtype):
    # Both compute max|x|/448 and x/scale in fp32 and round to nearest even: the results are identical.
    x = _activations(m, k, dtype)
    q_out, s_out = _poisoned(m, k, -(-k // 128))
    q, s = per_token_group_quant_fp8(x, out=q_out, scale_out=s_out)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x)
    assert q.data_ptr() == q_out.data_ptr() and s.data_ptr() == s_out.data_ptr()
    assert not q.float().isnan().any() and not s.isnan().any(), "an output element was not written"
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


def test_round_trip_error_is_within_e4m3_rounding():
    # Round to nearest with 3 mantissa bits: |error| <= 2^-4 |x| in the normal range and half the
    # subnormal step (2^-10) times the scale below it; each group's max maps to exactly +-448.
    x = _activations(5, 333, torch.float32)
    q, s = per_token_group_quant_fp8(x)
    err = (dequantize_activation_ref(q, s) - x).abs()
    bound = E4M3_REL_ERR * x.abs() + E4M3_SUBNORMAL_ABS_ERR * s.repeat_interleave(128, dim=1)[:, :333]
    assert (err <= bound).all()
    group_max = torch.nn.functional.pad(q.float().abs(), (0, 3 * 128 - 333)).view(5, 3, 128).amax(-1)
    assert torch.equal(group_max[s > AMAX_EPS], torch.full_like(group_max[s > AMAX_EPS], 448.0))


def test_zero_group_gets_positive_scale_and_zero_values():
    q, s = per_token_group_quant_fp8(torch.zeros(2, 130, dtype=torch.bfloat16))
    assert (s == AMAX_EPS / 448.0).all() and (q.float() == 0).all()


def test_other_group_size_and_non_contiguous_input():
    x = _activations(4, 300, torch.bfloat16).t().contiguous().t()  # column-major view
    q, s = per_token_group_quant_fp8(x, group_size=64)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x, 64)
    assert s.shape == (4, 5) and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_empty_batch():
    q, s = per_token_group_quant_fp8(torch.zeros(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (torch.zeros(2, 3, 128), {}, "2-D"),
        (torch.zeros(2, 128, dtype=torch.int32), {}, "activations must be"),
        (torch.zeros(2, 128), {"group_size": 100}, "power of two"),
        (torch.zeros(2, 128), {"scale_out": torch.zeros(2, 2)}, "scale_out"),
    ],
)
def test_rejects_bad_arguments(x, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        per_token_group_quant_fp8(x, **kwargs)
