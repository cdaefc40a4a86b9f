"""Fused MoE experts (sort/align + grouped FP8 GEMMs) vs the torch reference (Triton interpreter on CPU)."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from k2serve.kernels.fused_moe import fused_moe  # noqa: E402
from k2serve.kernels.moe_align import align_tokens_to_experts, max_padded_rows  # noqa: E402
from k2serve.kernels.reference import fused_moe_ref  # noqa: E402
from k2serve.kernels.moe_weights import stack_experts  # noqa: E402
from k2serve.kernels.testing import random_block_fp8, random_moe_weights, random_routing  # noqa: E402

# The kernel and `fused_moe_ref(quantize_activations=True)` take the same rounding steps; only fp32
# summation order differs, which can flip a rare bf16 rounding of the gate/up output (2^-8) or an
# e4m3 rounding of the activation (one e4m3 step, 2^-3 of that one element): 1% in norm is ample.
EMULATED_REL_TOL = 1e-2
# Against unquantized math: two quantization stages (x, then silu(gate)*up), each rounding every
# element by <= 2^-4 relative; random rounding errors average out in the dot products, so the
# relative error stays near the per-element RMS (~2^-4/sqrt(3) per stage): bound 2 * 2^-4.
UNQUANTIZED_REL_TOL = 2 * 2.0**-4


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _case(t, e, h, inter, k, seed=0, num_ids=None):
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    ids, weights = random_routing(t, k, num_ids or e, seed=seed)
    return x, ids, weights, random_moe_weights(e, h, inter, seed=seed)


def _check(x, ids, weights, w, expert_offset=0):
    out = torch.full_like(x, float("nan"))
    y = fused_moe(x, ids, weights, *w.as_args(), expert_offset=expert_offset, out=out)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any(), "an output element was not written"
    ref = fused_moe_ref(x, ids, weights, *w.as_args(), expert_offset=expert_offset)
    plain = fused_moe_ref(x, ids, weights, *w.as_args(), expert_offset=expert_offset, quantize_activations=False)
    assert _rel_err(y, ref) <= EMULATED_REL_TOL
    assert _rel_err(y, plain) <= UNQUANTIZED_REL_TOL
    return y


# (T, E, H, I, top_k): T = 1; partial blocks in H (200, 130) and I (96, 160: the gate and up scale grids
# stack to 2*ceil(I/128) rows, not ceil(2I/128)); more tokens than one BLOCK_M (T * k = 40 pairs).
@pytest.mark.parametrize("t,e,h,inter,k", [(1, 4, 200, 96, 2), (4, 4, 256, 160, 3), (10, 5, 130, 128, 4)])
def test_matches_reference(t, e, h, inter, k):
    _check(*_case(t, e, h, inter, k))


def test_uneven_loads_and_idle_experts():
    x, _, weights, w = _case(12, 6, 128, 96, 2, seed=3)
    ids = torch.tensor([[0, 2]] * 9 + [[2, 5]] * 3)  # expert 0: 9 tokens, 2: 12, 5: 3; 1, 3, 4: none
    _check(x, ids, weights, w)


def test_expert_parallel_ids_outside_the_local_range_are_skipped():
    # 3 local experts at global ids [3, 6) of 9; int32 ids as a dispatcher might send them.
    x, ids, weights, w = _case(6, 3, 128, 64, 3, seed=4, num_ids=9)
    y = _check(x, ids.to(torch.int32), weights, w, expert_offset=3)
    not_local = ((ids < 3) | (ids >= 6)).all(dim=1)
    assert torch.equal(y[not_local], torch.zeros_like(y[not_local]))


def test_alignment_pads_each_expert_and_skips_idle_ones():
    ids = torch.tensor([[0, 3], [3, 5], [9, 0], [3, 3]])
    align = align_tokens_to_experts(ids, num_experts=6, block_m=4)
    # counts: e0 = 2, e3 = 4, e5 = 1 (id 9 is not local) -> 3 blocks of 4; experts 1, 2, 4 get none
    assert align.num_padded.item() == 12 and align.max_rows == max_padded_rows(8, 6, 4)
    assert align.block_expert_ids[:3].tolist() == [0, 3, 5]
    rows = align.sorted_pair_ids[:12].view(3, 4).tolist()
    assert rows == [[0, 5, 8, 8], [1, 2, 6, 7], [3, 8, 8, 8]]  # pair = token * 2 + slot; 8 pads
    assert (align.sorted_pair_ids[12:] == 8).all()


def test_alignment_with_offset_keeps_every_local_pair_once():
    ids, _ = random_routing(50, 8, 64, seed=5)
    align = align_tokens_to_experts(ids, num_experts=16, block_m=16, expert_offset=16)
    n = align.num_padded.item()
    pairs = align.sorted_pair_ids[:n]
    local = ((ids >= 16) & (ids < 32)).reshape(-1).nonzero().flatten()
    assert torch.equal(pairs[pairs < 400].sort().values, local.to(torch.int32))
    experts = align.block_expert_ids[: n // 16].long()
    assert torch.equal(ids.reshape(-1)[pairs[pairs < 400].long()] - 16, experts.repeat_interleave(16)[pairs < 400])


def test_stack_experts_layout_and_shard():
    gen = torch.Generator().manual_seed(6)
    gate, up, down = ([random_block_fp8(r, c, gen) for _ in range(3)] for r, c in ((160, 200), (160, 200), (200, 160)))
    w = stack_experts(gate, up, down)
    # I = 160 is not a multiple of 128: the stacked scale grid has 2 * ceil(160/128) = 4 rows, not 3.
    assert w.w13_fp8.shape == (3, 320, 200) and w.w13_scale.shape == (3, 4, 2)
    assert w.w2_fp8.shape == (3, 200, 160) and w.w2_scale.shape == (3, 2, 2)
    assert torch.equal(w.w13_fp8[1, 160:].view(torch.uint8), up[1][0].view(torch.uint8))
    assert torch.equal(w.w13_scale[2, 2:], up[2][1]) and torch.equal(w.w13_scale[2, :2], gate[2][1])
    shard = w.shard(1, 2)
    assert shard.num_experts == 2 and torch.equal(shard.w2_scale[0], down[1][1])
    with pytest.raises(ValueError, match="same non-zero number"):
        stack_experts(gate, up, down[:2])


def test_rejects_bad_arguments():
    x, ids, weights, w = _case(2, 2, 128, 64, 2)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, ids, weights.double(), *w.as_args())
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, ids, weights, w.w13_fp8, w.w13_scale[:, :1], w.w2_fp8, w.w2_scale)
    with pytest.raises(ValueError, match="x must be"):
        fused_moe(x[None], ids, weights, *w.as_args())
