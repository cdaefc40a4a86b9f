"""MLA prefill vs the whole-context torch reference: the memory-bounded chunked path (key chunks, query
tiles, causal edges) and a step's short chunks attended together in padded groups."""

import pytest
import torch

from k2serve.kernels.latent_cache import FP8_KV_DTYPE
from k2serve.kernels.mla_prefill import mla_prefill
from k2serve.kernels.mla_prefill_batch import GROUP_PAIRS, plan_prefill, prefill
from k2serve.kernels.mla_reference import mla_prefill_ref
from k2serve.kernels.testing import random_paged_cache

HEADS, LATENT, ROPE, NOPE, V = 3, 64, 16, 32, 24

# (context_len, new tokens, block_size, key_chunk, query tile): one chunk; keys in chunks of one block;
# a chunk boundary inside the new tokens; tiles that do not divide the chunk; a single new token;
# chunks and tiles of K2-like proportions (block 64).
CASES = [(0, 7, 16, 2048, 512), (0, 50, 16, 16, 8), (37, 20, 16, 32, 5), (100, 60, 16, 48, 7), (5, 2, 16, 16, 1),
         (150, 90, 64, 128, 32)]


def _inputs(context_len, num_new, block_size, cache_dtype=torch.float32, q_dtype=torch.float32, kv_scale=1.0, seed=0):
    cache, (table,) = random_paged_cache([context_len + num_new], block_size, LATENT + ROPE, seed, cache_dtype,
                                         kv_scale=kv_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(num_new, HEADS, NOPE + ROPE, generator=gen).to(q_dtype)
    w_kv = (torch.randn(HEADS, NOPE + V, LATENT, generator=gen) * LATENT**-0.5).to(q_dtype)
    return q, cache, torch.tensor(table), w_kv


@pytest.mark.parametrize("context_len,num_new,block_size,key_chunk,tile", CASES)
def test_prefill_matches_reference(context_len, num_new, block_size, key_chunk, tile):
    q, cache, table, w_kv = _inputs(context_len, num_new, block_size)
    score_bytes = 4 * HEADS * key_chunk * tile  # exactly `tile` queries per tile at a full chunk
    out = mla_prefill(q, cache, table, context_len, w_kv, 0.2, key_chunk=key_chunk, score_bytes=score_bytes)
    ref = mla_prefill_ref(q, cache, table, context_len, w_kv, 0.2)
    assert out.shape == (num_new, HEADS, V) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("cache_dtype,q_dtype,tol", [(torch.bfloat16, torch.bfloat16, 2.0**-6),
                                                     (FP8_KV_DTYPE, torch.float32, 1e-5)])
def test_prefill_other_dtypes(cache_dtype, q_dtype, tol):
    # bf16: matmuls round their outputs (k/v expansion, scores, probabilities) to bf16, a few ulps in all.
    # FP8: the reference reads the same stored values (times the scale), so only float32 rounding differs.
    kv_scale = 0.25 if cache_dtype == FP8_KV_DTYPE else 1.0
    q, cache, table, w_kv = _inputs(40, 30, 16, cache_dtype, q_dtype, kv_scale, seed=4)
    out = mla_prefill(q, cache, table, 40, w_kv, 0.2, kv_scale, key_chunk=32, score_bytes=4 * HEADS * 32 * 8)
    ref = mla_prefill_ref(q, cache, table, 40, w_kv, 0.2, kv_scale)
    assert out.dtype == q_dtype
    assert (out.float() - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))


def test_prefill_scores_stay_within_budget(monkeypatch):
    # The largest score tile is heads x tile x chunk float32 <= score_bytes, however long the context.
    import k2serve.kernels.mla_prefill as prefill

    sizes = []
    original = prefill._tile_scores
    monkeypatch.setattr(prefill, "_tile_scores", lambda *a: sizes.append((s := original(*a)).numel() * 4) or s)
    q, cache, table, w_kv = _inputs(300, 200, 16, seed=2)
    budget = 4 * HEADS * 64 * 16
    out = mla_prefill(q, cache, table, 300, w_kv, 0.2, key_chunk=64, score_bytes=budget)
    assert max(sizes) <= budget and len(sizes) > 50
    assert (out - mla_prefill_ref(q, cache, table, 300, w_kv, 0.2)).abs().max() <= 1e-5


def _step(chunks, block_size=16, cache_dtype=torch.float32, kv_scale=1.0, seed=6):
    """One step's prefill chunks (context_len, new tokens) laid out one after another in q [T, H, Dqk]."""
    cache, tables = random_paged_cache([c + n for c, n in chunks], block_size, LATENT + ROPE, seed, cache_dtype,
                                       kv_scale=kv_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(n for _, n in chunks) + 2, HEADS, NOPE + ROPE, generator=gen)  # 2 rows not prefilled
    w_kv = torch.randn(HEADS, NOPE + V, LATENT, generator=gen) * LATENT**-0.5
    seqs, start = [], 1
    for (ctx, n), table in zip(chunks, tables):
        seqs.append((start, start + n, ctx, table))
        start += n
    return q, cache, seqs, w_kv


@pytest.mark.parametrize("pairs", [GROUP_PAIRS, 2000])
def test_step_prefill_matches_reference_chunk_by_chunk(pairs):
    # Ragged chunks, with and without context, partial blocks; with the small pair budget the groups split
    # and the long chunk goes through the memory-bounded path.
    chunks = [(0, 7), (20, 2), (0, 33), (70, 40), (3, 5), (0, 90)]
    q, cache, seqs, w_kv = _step(chunks)
    plan = plan_prefill(seqs, 16, "cpu", pairs)
    assert (len(plan.groups), len(plan.long)) == ((1, 0) if pairs == GROUP_PAIRS else (3, 2))
    out = torch.full((q.shape[0], HEADS, V), float("nan"))
    prefill(q, cache, plan, w_kv, 0.2, 1.0, out)
    assert out[0].isnan().all() and out[-1].isnan().all(), "rows that are not prefilled are left alone"
    for start, end, ctx, table in seqs:
        ref = mla_prefill_ref(q[start:end], cache, torch.tensor(table), ctx, w_kv, 0.2)
        assert (out[start:end] - ref).abs().max() <= 1e-5


def test_groups_stay_within_the_pair_budget():
    chunks = [(0, 7), (20, 2), (0, 33), (70, 40), (3, 5), (0, 90), (500, 3), (0, 64), (0, 64)]
    _, _, seqs, _ = _step(chunks)
    for pairs in (1000, 5000, 20000):
        plan = plan_prefill(seqs, 16, "cpu", pairs)
        assert all(g.masked.numel() <= pairs for g in plan.groups)
        grouped = sorted(r for g in plan.groups for r in g.out_rows.tolist())
        long = sorted(r for s in plan.long for r in range(s.start, s.end))
        assert sorted(grouped + long) == list(range(1, 1 + sum(n for _, n in chunks)))


def test_group_prefill_fp8_cache():
    q, cache, seqs, w_kv = _step([(0, 9), (17, 4)], cache_dtype=FP8_KV_DTYPE, kv_scale=0.5)
    out = torch.zeros(q.shape[0], HEADS, V)
    prefill(q, cache, plan_prefill(seqs, 16, "cpu"), w_kv, 0.2, 0.5, out)
    for start, end, ctx, table in seqs:
        ref = mla_prefill_ref(q[start:end], cache, torch.tensor(table), ctx, w_kv, 0.2, 0.5)
        assert (out[start:end] - ref).abs().max() <= 1e-5
