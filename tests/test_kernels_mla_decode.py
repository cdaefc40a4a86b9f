"""Paged MLA decode: the Triton kernel (interpreter on CPU) and the batched torch implementation vs the
per-sequence torch reference, over block sizes, ragged context lengths, head counts and cache dtypes."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the attention kernels need it")

from k2serve.kernels.latent_cache import FP8_KV_DTYPE  # noqa: E402
from k2serve.kernels.mla_decode import mla_decode  # noqa: E402
from k2serve.kernels.mla_decode_torch import choose_split_tokens, mla_decode_torch, plan_torch_decode  # noqa: E402
from k2serve.kernels.mla_reference import mla_decode_ref  # noqa: E402
from k2serve.kernels.testing import random_paged_cache  # noqa: E402

# (seq_lens, block_size, heads, latent_dim, rope_dim): one token; partial and exact blocks; a context of
# several blocks beside short ones; heads beyond one 16-head program group (20); K2's widths (512 + 64)
# with 8 heads (TP8) and block size 64; a latent width that is not a power of two (80).
CASES = [
    ([1], 16, 4, 128, 16),
    ([1, 15, 16, 17, 70], 16, 5, 128, 16),
    ([3, 200, 33], 16, 20, 64, 16),
    ([130, 1, 64, 65], 64, 8, 512, 64),
    ([40, 9], 4, 3, 80, 16),
]


def _inputs(seq_lens, block_size, heads, latent_dim, rope_dim, cache_dtype, q_dtype, kv_scale=1.0, seed=0):
    cache, tables = random_paged_cache(seq_lens, block_size, latent_dim + rope_dim, seed, cache_dtype,
                                       kv_scale=kv_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    q_latent = (torch.randn(len(seq_lens), heads, latent_dim, generator=gen) * 0.2).to(q_dtype)
    q_pe = (torch.randn(len(seq_lens), heads, rope_dim, generator=gen) * 0.2).to(q_dtype)
    return q_latent, q_pe, cache, tables


def _padded(tables):
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def _tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # float32: summation order only. bf16: the output's rounding (half an ulp, <= 2^-8 of the largest
    # element) and, in the torch path, bf16 rounding of the scores and probabilities before their matmuls
    # (one more ulp of the output, as measured); 2^-7 of the largest element covers both.
    return 1e-5 if dtype == torch.float32 else 2.0**-7 * float(ref.abs().max())


@pytest.mark.parametrize("seq_lens,block_size,heads,latent_dim,rope_dim", CASES)
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, FP8_KV_DTYPE)])
def test_triton_decode_matches_reference(seq_lens, block_size, heads, latent_dim, rope_dim, q_dtype, cache_dtype):
    kv_scale = 0.5 if cache_dtype == FP8_KV_DTYPE else 1.0
    q_latent, q_pe, cache, tables = _inputs(seq_lens, block_size, heads, latent_dim, rope_dim, cache_dtype, q_dtype,
                                            kv_scale)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = mla_decode_ref(q_latent, q_pe, cache, _padded(tables), lens, 0.3, kv_scale)
    # One part per context, and several (with BLOCK_N = 32, more parts than tiles for the short contexts:
    # those parts are empty and skipped).
    for num_splits in (1, 4):
        out = mla_decode(q_latent, q_pe, cache, _padded(tables), lens, 0.3, kv_scale, num_splits=num_splits)
        assert out.shape == ref.shape and out.dtype == q_dtype
        assert (out.float() - ref).abs().max() <= _tolerance(ref, q_dtype), f"num_splits={num_splits}"


def test_triton_decode_default_split_and_many_empty_parts():
    seq_lens = [1, 47, 100]
    q_latent, q_pe, cache, tables = _inputs(seq_lens, 16, 3, 64, 16, torch.float32, torch.float32, seed=7)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = mla_decode_ref(q_latent, q_pe, cache, _padded(tables), lens, 0.3)
    for kwargs in ({"max_seq_len": 100}, {}, {"num_splits": 64}):
        out = mla_decode(q_latent, q_pe, cache, _padded(tables), lens, 0.3, **kwargs)
        assert (out - ref).abs().max() <= 1e-5, kwargs


@pytest.mark.parametrize("seq_lens,block_size,heads,latent_dim,rope_dim", CASES)
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, FP8_KV_DTYPE)])
def test_torch_decode_matches_reference(seq_lens, block_size, heads, latent_dim, rope_dim, q_dtype, cache_dtype):
    kv_scale = 2.0 if cache_dtype == FP8_KV_DTYPE else 1.0
    q_latent, q_pe, cache, tables = _inputs(seq_lens, block_size, heads, latent_dim, rope_dim, cache_dtype, q_dtype,
                                            kv_scale, seed=3)
    ref = mla_decode_ref(q_latent, q_pe, cache, _padded(tables), torch.tensor(seq_lens), 0.3, kv_scale)
    plan = plan_torch_decode(seq_lens, tables, block_size, "cpu")
    out = mla_decode_torch(q_latent, q_pe, cache, plan, 0.3, kv_scale)
    assert out.shape == ref.shape and out.dtype == q_dtype
    assert (out.float() - ref).abs().max() <= _tolerance(ref, q_dtype)


def test_torch_decode_merges_parts_of_long_contexts():
    # One long context among short ones is split into several parts (merged by log-sum-exp), so the short
    # ones are not padded to its length.
    seq_lens = [3, 5, 1500, 2]
    q_latent, q_pe, cache, tables = _inputs(seq_lens, 16, 4, 64, 16, torch.float32, torch.float32, seed=5)
    plan = plan_torch_decode(seq_lens, tables, 16, "cpu")
    assert not plan.is_one_part_each and plan.split_tokens < 1500
    assert plan.item_padding.numel() < 2 * sum(seq_lens)
    ref = mla_decode_ref(q_latent, q_pe, cache, _padded(tables), torch.tensor(seq_lens), 0.3)
    assert (mla_decode_torch(q_latent, q_pe, cache, plan, 0.3) - ref).abs().max() <= 1e-5


def test_split_size_bounds_padding():
    for seq_lens in ([1], [16] * 8, [17, 300, 5, 5, 5], [4000, 1], list(range(1, 300, 7))):
        split = choose_split_tokens(seq_lens, 16)
        assert split % 16 == 0
        padded = sum(-(-n // split) for n in seq_lens) * split
        assert padded <= 2 * sum(seq_lens) + 16 * len(seq_lens) + 32 * len(seq_lens), (seq_lens, split)


def test_decode_rejects_bad_arguments():
    q_latent, q_pe, cache, tables = _inputs([5, 9], 16, 2, 64, 16, torch.float32, torch.float32)
    lens, bt = torch.tensor([5, 9], dtype=torch.int32), _padded(tables)
    with pytest.raises(ValueError, match="cache \\[num_blocks, block_size, 80\\]"):
        mla_decode(q_latent, q_pe, cache[..., :64], bt, lens, 0.1)
    with pytest.raises(TypeError, match="share one of"):
        mla_decode(q_latent, q_pe.double(), cache, bt, lens, 0.1)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        mla_decode(q_latent, q_pe, cache, bt.long(), lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens must be int32 \\[2\\]"):
        mla_decode(q_latent, q_pe, cache, bt, lens[:1], 0.1)
    with pytest.raises(TypeError, match="cache dtype"):
        mla_decode(q_latent, q_pe, cache.to(torch.float64), bt, lens, 0.1)
    assert mla_decode(q_latent[:0], q_pe[:0], cache, bt[:0], lens[:0], 0.1).shape == (0, 2, 64)
