"""Paged MLA decode (Triton): absorbed attention over the latent cache, split-KV (flash-decoding).

Each sequence brings one query per head in absorbed form: `q_latent = q_nope @ W_UK` (kv_lora_rank wide,
512 for K2) and the rotated `q_pe` (64). Scores run over the cached `[latent | k_rope]` entries (576 wide),
values are the latents themselves; the caller applies W_UV afterwards.

Stage 1 gives each program one sequence, a group of BLOCK_H heads (they share every cache entry they
read) and one of `num_splits` equal parts of that sequence's context; it walks its part in tiles of
BLOCK_N tokens, finding each token's cache row through the block table (no gathered or padded copy),
and keeps an online softmax. It writes a partial output and its log-sum-exp. Stage 2 merges the
partials of each (sequence, head). Context lengths differ per sequence within one launch; parts past a
sequence's end are empty and skipped. The cache may be float (bf16/fp16/fp32) or float8_e4m3fn with a
per-tensor scale. The torch reference is `kernels.mla_reference.mla_decode_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2serve.kernels.latent_cache import FP8_KV_DTYPE
from k2serve.kernels.triton_cast import cast_for_store, is_interpreter

Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_DTYPES = (*Q_DTYPES, FP8_KV_DTYPE)
LOG2E = 1.4426950408889634
MAX_SPLITS = 256
# Heads per program: tl.dot needs 16 rows; K2 has 8 heads per rank under TP8 (masked up to 16).
BLOCK_H = 16
GPU_LAUNCH = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
INTERPRETER_LAUNCH = {"BLOCK_N": 32}
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _load_kv(ptrs, mask, kv_scale, COMPUTE: tl.constexpr, IS_FP8: tl.constexpr):
    """A tile of cache entries in the compute dtype (FP8 entries times the per-tensor scale)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if IS_FP8:
        x = x.to(tl.float32) * kv_scale
    return x.to(COMPUTE)


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Tokens per part: the context split into num_splits parts, rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _attend_tile(q_lat, q_pe, k_lat, k_pe, n_ok, m, l, acc, qk_scale, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile of cache entries into the online softmax of BLOCK_H heads: updated (max, sum, output)."""
    qk = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
    qk += tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
    qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))  # log2 domain
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), k_lat, input_precision=PRECISION)  # [BLOCK_H, BLOCK_DL]
    return m_new, l, acc


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, o_part_ptr, lse_part_ptr,
    qk_scale, kv_scale, num_heads, num_splits,
    stride_qlb, stride_qlh, stride_qpb, stride_qph, stride_cache_block, stride_cache_token, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    LATENT_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, IS_FP8: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_group = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = _split_len(seq_len, num_splits, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start < end:
        offs_h = head_group * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        offs_dl = tl.arange(0, BLOCK_DL)  # [BLOCK_DL]
        offs_dr = tl.arange(0, BLOCK_DR)  # [BLOCK_DR]
        h_ok, dl_ok, dr_ok = offs_h < num_heads, offs_dl < LATENT_DIM, offs_dr < ROPE_DIM
        q_lat = tl.load(q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_dl[None, :],
                        mask=h_ok[:, None] & dl_ok[None, :], other=0.0).to(COMPUTE)  # [BLOCK_H, BLOCK_DL]
        q_pe = tl.load(q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_dr[None, :],
                       mask=h_ok[:, None] & dr_ok[None, :], other=0.0).to(COMPUTE)  # [BLOCK_H, BLOCK_DR]
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DL], dtype=tl.float32)
        table = block_tables_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
            n_ok = offs_n < end
            block_id = tl.load(table + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
            row = cache_ptr + block_id * stride_cache_block + (offs_n % PAGE_SIZE) * stride_cache_token  # [BLOCK_N]
            k_lat = _load_kv(row[:, None] + offs_dl[None, :], n_ok[:, None] & dl_ok[None, :], kv_scale,
                             COMPUTE, IS_FP8)  # [BLOCK_N, BLOCK_DL]: keys and values
            k_pe = _load_kv(row[:, None] + LATENT_DIM + offs_dr[None, :], n_ok[:, None] & dr_ok[None, :], kv_scale,
                            COMPUTE, IS_FP8)  # [BLOCK_N, BLOCK_DR]
            m, l, acc = _attend_tile(q_lat, q_pe, k_lat, k_pe, n_ok, m, l, acc, qk_scale, COMPUTE, PRECISION)
        o_ptrs = o_part_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_dl[None, :]
        tl.store(o_ptrs, acc / l[:, None], mask=h_ok[:, None] & dl_ok[None, :])
        tl.store(lse_part_ptr + b * stride_lb + offs_h * stride_lh + split, m + tl.log2(l), mask=h_ok)


@triton.jit
def _mla_decode_merge_kernel(
    o_part_ptr, lse_part_ptr, seq_lens_ptr, out_ptr, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    LATENT_DIM: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_parts = tl.cdiv(seq_len, _split_len(seq_len, num_splits, BLOCK_N))  # the non-empty parts
    offs_dl = tl.arange(0, BLOCK_DL)
    dl_ok = offs_dl < LATENT_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_DL], dtype=tl.float32)
    for s in range(0, num_parts):
        lse = tl.load(lse_part_ptr + b * stride_lb + h * stride_lh + s)
        o = tl.load(o_part_ptr + b * stride_ob + h * stride_oh + s * stride_os + offs_dl, mask=dl_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + o * w
        l = l * alpha + w
        m = m_new
    out = cast_for_store(acc / l, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_dl, out, mask=dl_ok)


def _check_args(q_latent, q_pe, cache, block_tables, seq_lens) -> None:
    if q_latent.dim() != 3 or q_pe.dim() != 3 or q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"expected q_latent [B, H, Dl] and q_pe [B, H, Dr], got {tuple(q_latent.shape)} "
                         f"and {tuple(q_pe.shape)}")
    if q_latent.dtype not in Q_DTYPES or q_pe.dtype != q_latent.dtype:
        raise TypeError(f"q_latent and q_pe must share one of {Q_DTYPES}, got {q_latent.dtype} and {q_pe.dtype}")
    width = q_latent.shape[-1] + q_pe.shape[-1]
    if cache.dim() != 3 or cache.shape[-1] != width:
        raise ValueError(f"expected cache [num_blocks, block_size, {width}], got {tuple(cache.shape)}")
    if cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache.dtype}")
    batch = q_latent.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if tuple(seq_lens.shape) != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if any(t.stride(-1) != 1 for t in (q_latent, q_pe, cache, block_tables)):
        raise ValueError("q_latent, q_pe, cache and block_tables must be contiguous in their last dimension")
    devices = {t.device for t in (q_latent, q_pe, cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {devices}")


def choose_num_splits(batch: int, num_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Parts per context: enough programs to fill the GPU twice over, each part at least 4 tiles long."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_seq_len, 4 * INTERPRETER_LAUNCH["BLOCK_N"])))
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * triton.cdiv(num_heads, BLOCK_H)
    useful = triton.cdiv(max_seq_len, 4 * GPU_LAUNCH["BLOCK_N"])
    return max(1, min(triton.cdiv(2 * num_sms, programs), useful, MAX_SPLITS))


def mla_decode(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, kv_scale: float = 1.0, max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed paged MLA decode: q_latent [B, H, Dl], q_pe [B, H, Dr] over cache [N, block_size, Dl + Dr]
    through block_tables [B, max_blocks] int32, seq_lens [B] int32 (>= 1) -> [B, H, Dl] in q's dtype.

    `max_seq_len` (a host int, e.g. from the step's plan) sizes the split; without it or `num_splits` the
    wrapper reads seq_lens' maximum, which synchronizes with the device.
    """
    _check_args(q_latent, q_pe, cache, block_tables, seq_lens)
    batch, num_heads, latent_dim = q_latent.shape
    out = torch.empty_like(q_latent)
    if batch == 0:
        return out
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        num_splits = choose_num_splits(batch, num_heads, longest, q_latent.device)
    interpret = is_interpreter()
    launch = INTERPRETER_LAUNCH if interpret else GPU_LAUNCH
    o_part = torch.empty(batch, num_heads, num_splits, latent_dim, dtype=torch.float32, device=q_latent.device)
    lse_part = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    dims = dict(LATENT_DIM=latent_dim, BLOCK_DL=triton.next_power_of_2(latent_dim))
    compute = tl.float32 if interpret else _TL_DTYPES[q_latent.dtype]  # the interpreter miscomputes bf16
    _mla_decode_split_kernel[(batch, triton.cdiv(num_heads, BLOCK_H), num_splits)](
        q_latent, q_pe, cache, block_tables, seq_lens, o_part, lse_part,
        sm_scale * LOG2E, kv_scale, num_heads, num_splits,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        ROPE_DIM=q_pe.shape[-1], BLOCK_DR=max(16, triton.next_power_of_2(q_pe.shape[-1])), PAGE_SIZE=cache.shape[1],
        BLOCK_H=BLOCK_H, COMPUTE=compute, IS_FP8=cache.dtype == FP8_KV_DTYPE,
        PRECISION="ieee" if compute == tl.float32 else "tf32", **dims, **launch,
    )
    _mla_decode_merge_kernel[(batch, num_heads)](
        o_part, lse_part, seq_lens, out, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), BLOCK_N=launch["BLOCK_N"], INTERPRET=interpret, **dims,
    )
    return out
