"""MLA attention cases for benchmarks/gpu_kernels.py: checks against the torch references and timings of
the paged decode kernel (Triton, split-KV) and the chunked prefill, at Kimi K2's attention shapes.

Decode: kv_lora_rank 512 + rope 64, 8 local heads (64 heads over TP8) or 64 (DP attention), cache blocks
of 64 (and 16) tokens in shuffled order, batch 1..256, contexts 1K..128K, a bf16 and an FP8 cache. The
baseline is the batched torch implementation (the CPU backend's: gather the contexts' blocks, bmm) on
the same GPU, where its gathered copy fits. Decode is memory-bound: the % copy BW column is the one to read.
Prefill: an 8K-token chunk over 0 or 32K cached tokens; its baseline (no cached context only) is torch
SDPA on k/v expanded beforehand, i.e. what a flash kernel would reach.
Torch and the kernels are imported inside the functions (gpu_kernels.py sets TRITON_INTERPRET first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kernel_timing import Row


@dataclass(frozen=True)
class AttentionShapes:
    latent_dim: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    decode: tuple[tuple[int, int, int, str, int, int], ...]  # (heads, block, dtype bits, cache, batch, context)
    prefill: tuple[tuple[int, int, int], ...]  # (heads, new tokens, cached context)
    max_baseline_tokens: int  # the torch decode baseline copies the contexts: skip it above this many tokens
    check_lens: tuple[int, ...] = (1, 17, 300, 5000, 193)  # ragged contexts of the correctness check
    check_configs: tuple[tuple[int, int, bool], ...] = ((8, 64, False), (64, 64, False), (8, 16, False), (8, 64, True))


def _k2_decode_cases():
    contexts = ((1, 1024), (1, 32768), (1, 131072), (16, 8192), (64, 4096), (64, 32768), (256, 1024), (256, 8192),
                (256, 32768))
    cases = [(heads, 64, 16, "bf16", b, s) for heads in (8, 64) for b, s in contexts]
    cases += [(8, 16, 16, "bf16", b, s) for b, s in contexts[3:6]]
    cases += [(8, 64, 8, "fp8", b, s) for b, s in ((1, 131072), (64, 32768), (256, 8192))]
    return tuple(cases)


K2_ATTENTION = AttentionShapes(512, 64, 128, 128, _k2_decode_cases(), ((8, 8192, 0), (8, 8192, 32768), (64, 8192, 0)),
                               max_baseline_tokens=1 << 22)
SMOKE_ATTENTION = AttentionShapes(64, 16, 32, 32, ((4, 16, 16, "bf16", 2, 40), (4, 16, 8, "fp8", 2, 40)),
                                  ((4, 20, 30),), max_baseline_tokens=1 << 16, check_lens=(1, 17, 40),
                                  check_configs=((4, 16, False), (4, 16, True)))


def plan_attention(shapes: AttentionShapes) -> list[str]:
    cases = [f"mla_decode H={h} block={bs} {c} B={b} ctx={s}" for h, bs, _, c, b, s in shapes.decode]
    return cases + [f"mla_prefill H={h} L={n} ctx={c}" for h, n, c in shapes.prefill]


def _rel(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def paged_cache(torch, device, seq_lens: list[int], block: int, width: int, fp8: bool, seed: int = 0):
    """A bf16 (or e4m3) cache holding the contexts in shuffled blocks, and the int32 block table [B, max]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [math.ceil(n / block) for n in seq_lens]
    total = sum(blocks) + 1
    cache = torch.randn(total, block, width, device=device, generator=gen, dtype=torch.bfloat16)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    order = torch.randperm(total, device=device, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = order[used: used + n]
        used += n
    return cache, table


def _decode_inputs(torch, device, shapes, heads, seq_lens, block, fp8, seed=0):
    cache, table = paged_cache(torch, device, seq_lens, block, shapes.latent_dim + shapes.rope_dim, fp8, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    b = len(seq_lens)
    q_latent = torch.randn(b, heads, shapes.latent_dim, device=device, generator=gen).to(torch.bfloat16)
    q_pe = torch.randn(b, heads, shapes.rope_dim, device=device, generator=gen).to(torch.bfloat16)
    return q_latent, q_pe, cache, table, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def _torch_plan(seq_lens, table, block, device):
    from k2serve.kernels.mla_decode_torch import plan_torch_decode

    tables = [row[: math.ceil(n / block)] for row, n in zip(table.tolist(), seq_lens)]
    return plan_torch_decode(seq_lens, tables, block, device)


def check_mla_decode(torch, device, shapes: AttentionShapes):
    """The kernel and the torch implementation vs the float32 reference on ragged contexts; bf16 inputs
    (fp32 accumulation, probabilities and output rounded to bf16): max error <= 2^-6 of the largest output."""
    from k2serve.kernels.mla_decode import mla_decode
    from k2serve.kernels.mla_decode_torch import mla_decode_torch
    from k2serve.kernels.mla_reference import mla_decode_ref

    details, ok = [], True
    seq_lens = list(shapes.check_lens)
    for heads, block, fp8 in shapes.check_configs:
        q_latent, q_pe, cache, table, lens = _decode_inputs(torch, device, shapes, heads, seq_lens, block, fp8, heads)
        scale = (shapes.nope_dim + shapes.rope_dim) ** -0.5
        ref = mla_decode_ref(q_latent, q_pe, cache, table, lens, scale)
        bound = 2.0**-6 * float(ref.abs().max())
        got = mla_decode(q_latent, q_pe, cache, table, lens, scale, max_seq_len=max(seq_lens))
        base = mla_decode_torch(q_latent, q_pe, cache, _torch_plan(seq_lens, table, block, device), scale)
        errs = [float((y.float() - ref).abs().max()) for y in (got, base)]
        ok &= bool(not got.isnan().any()) and max(errs) <= bound
        details.append(f"H={heads} block={block}{' fp8' if fp8 else ''}: kernel {errs[0]:.1e}, torch {errs[1]:.1e}")
    return ok, f"bound {bound:.1e}; " + "; ".join(details)


def check_mla_prefill(torch, device, shapes: AttentionShapes):
    """Chunked prefill (chunks of 256 keys, tiles of 64 queries) vs the whole-context float32 reference, bf16."""
    from k2serve.kernels.mla_prefill import mla_prefill
    from k2serve.kernels.mla_reference import mla_prefill_ref

    heads, new, context = 8, 300, 700
    q, cache, table, w_kv = _prefill_inputs(torch, device, shapes, heads, new, context)
    scale = (shapes.nope_dim + shapes.rope_dim) ** -0.5
    got = mla_prefill(q, cache, table, context, w_kv, scale, key_chunk=256, score_bytes=4 * heads * 256 * 64)
    rel = _rel(got, mla_prefill_ref(q, cache, table, context, w_kv, scale))
    return rel <= 2.0**-6, f"H={heads} L={new} ctx={context}: relative error {rel:.1e}"


def _prefill_inputs(torch, device, shapes, heads, new, context):
    cache, table = paged_cache(torch, device, [context + new], 64, shapes.latent_dim + shapes.rope_dim, False, 3)
    gen = torch.Generator(device=device).manual_seed(4)
    q = torch.randn(new, heads, shapes.nope_dim + shapes.rope_dim, device=device, generator=gen).to(torch.bfloat16)
    w_kv = torch.randn(heads, shapes.nope_dim + shapes.v_dim, shapes.latent_dim, device=device, generator=gen)
    return q, cache, table[0].long(), (w_kv * shapes.latent_dim**-0.5).to(torch.bfloat16)


def time_mla_decode(torch, device, shapes: AttentionShapes, timer, case) -> Row:
    from k2serve.kernels.mla_decode import mla_decode
    from k2serve.kernels.mla_decode_torch import mla_decode_torch

    heads, block, bits, cache_name, batch, context = case
    seq_lens = [context] * batch
    q_latent, q_pe, cache, table, lens = _decode_inputs(torch, device, shapes, heads, seq_lens, block, bits == 8)
    scale = (shapes.nope_dim + shapes.rope_dim) ** -0.5
    ms = timer(lambda: mla_decode(q_latent, q_pe, cache, table, lens, scale, max_seq_len=context))
    base = None
    if batch * context <= shapes.max_baseline_tokens:
        plan = _torch_plan(seq_lens, table, block, device)
        base = timer(lambda: mla_decode_torch(q_latent, q_pe, cache, plan, scale))
    width = shapes.latent_dim + shapes.rope_dim
    nbytes = batch * context * width * bits // 8 + batch * heads * (width + shapes.latent_dim) * 2
    flops = 2.0 * batch * heads * context * (width + shapes.latent_dim)
    shape = f"H={heads} block={block} {cache_name} ctx={context}"
    return Row("mla_decode", shape, batch, ms, base, flops, nbytes)


def time_mla_prefill(torch, device, shapes: AttentionShapes, timer, case) -> Row:
    from k2serve.kernels.mla_prefill import mla_prefill

    heads, new, context = case
    q, cache, table, w_kv = _prefill_inputs(torch, device, shapes, heads, new, context)
    scale = (shapes.nope_dim + shapes.rope_dim) ** -0.5
    ms = timer(lambda: mla_prefill(q, cache, table, context, w_kv, scale))
    base = None
    if context == 0:  # flash/efficient SDPA on k/v expanded beforehand: the bar a flash prefill kernel sets
        base = _sdpa_ms(torch, device, shapes, timer, q, heads, new)
    seq = context + new
    flops = 2.0 * heads * new * (context + new / 2) * (shapes.nope_dim + shapes.rope_dim + shapes.v_dim)
    flops += 2.0 * seq * shapes.latent_dim * heads * (shapes.nope_dim + shapes.v_dim)  # expanding k and v
    nbytes = seq * (shapes.latent_dim + shapes.rope_dim) * 2 + new * heads * (q.shape[-1] + shapes.v_dim) * 2
    return Row("mla_prefill", f"H={heads} ctx={context}", new, ms, base, flops, nbytes)


def _sdpa_ms(torch, device, shapes, timer, q, heads, new) -> float:
    gen = torch.Generator(device=device).manual_seed(5)
    k = torch.randn(1, heads, new, q.shape[-1], device=device, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, heads, new, shapes.v_dim, device=device, generator=gen).to(torch.bfloat16)
    qh = q.transpose(0, 1)[None]  # [1, H, L, Dn + Dr]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return timer(lambda: sdpa(qh, k, v, is_causal=True))
