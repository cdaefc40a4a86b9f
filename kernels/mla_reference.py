"""Torch references for MLA attention over the paged latent cache: the yardsticks of the attention kernels.

One layer's cache is [num_blocks, block_size, latent_dim + rope_dim] and holds `[latent | k_rope]` per
token, either in a float dtype or as float8_e4m3fn storing `value / kv_scale` (`kernels.latent_cache`).
A sequence's token p lives at `cache[block_table[p // block_size], p % block_size]`.

Everything here runs in float32, one sequence at a time, materialising the whole score matrix: slow and
plainly right. The kernels must match it.
"""

from __future__ import annotations

import torch

from k2serve.kernels.latent_cache import dequantize, gather_blocks


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, kv_scale: float = 1.0) -> torch.Tensor:
    """A sequence's first `seq_len` cache entries in order, float32: [seq_len, latent_dim + rope_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)].long()
    entries = gather_blocks(cache, blocks).reshape(-1, cache.shape[-1])[:seq_len]  # [S, D]
    return dequantize(entries, kv_scale, torch.float32)


def mla_decode_ref(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, kv_scale: float = 1.0,
) -> torch.Tensor:
    """Absorbed MLA decode: one query per sequence over its whole cached context.

    q_latent [B, H, Dl] (q_nope already multiplied by W_UK), q_pe [B, H, Dr], block_tables [B, >= blocks],
    seq_lens [B] -> [B, H, Dl] float32: `softmax(sm_scale * (q_latent . latent + q_pe . k_rope)) @ latent`.
    """
    latent_dim = q_latent.shape[-1]
    out = torch.empty(q_latent.shape, dtype=torch.float32, device=q_latent.device)  # [B, H, Dl]
    for b, seq_len in enumerate(seq_lens.tolist()):
        ctx = gather_context(cache, block_tables[b], seq_len, kv_scale)  # [S, Dl + Dr]
        q = torch.cat([q_latent[b], q_pe[b]], dim=-1).float()  # [H, Dl + Dr]
        probs = (q @ ctx.T * sm_scale).softmax(dim=-1)  # [H, S]
        out[b] = probs @ ctx[:, :latent_dim]
    return out


def mla_prefill_ref(
    q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, context_len: int, w_kv: torch.Tensor,
    sm_scale: float, kv_scale: float = 1.0,
) -> torch.Tensor:
    """Expanded MLA prefill of one sequence: its L new queries (positions context_len .. context_len + L - 1,
    already in the cache) attend causally over the whole context.

    q [L, H, Dn + Dr], w_kv [H, Dn + Dv, Dl] (kv_b_proj per head: W_UK rows, then W_UV rows) -> [L, H, Dv] float32.
    """
    num_queries, _, qk_dim = q.shape
    nope_dim = qk_dim - (cache.shape[-1] - w_kv.shape[-1])
    ctx = gather_context(cache, block_table, context_len + num_queries, kv_scale)  # [S, Dl + Dr]
    latent, k_pe = ctx[:, : w_kv.shape[-1]], ctx[:, w_kv.shape[-1]:]
    kv = torch.einsum("sc,hdc->shd", latent, w_kv.float())  # [S, H, Dn + Dv]
    k = torch.cat([kv[..., :nope_dim], k_pe[:, None, :].expand(-1, kv.shape[1], -1)], dim=-1)  # [S, H, Dn + Dr]
    scores = torch.einsum("lhd,shd->hls", q.float(), k) * sm_scale  # [H, L, S]
    q_pos = torch.arange(num_queries, device=q.device)[:, None] + context_len
    k_pos = torch.arange(ctx.shape[0], device=q.device)[None, :]
    probs = scores.masked_fill(k_pos > q_pos, float("-inf")).softmax(dim=-1)
    return torch.einsum("hls,shd->lhd", probs, kv[..., nope_dim:])  # [L, H, Dv]
