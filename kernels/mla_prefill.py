"""Memory-bounded MLA prefill over the paged latent cache (torch, any device).

A prefill chunk of L new tokens (already written to the cache) attends causally to itself and fully to
the sequence's cached context, in the expanded form: `kv_b_proj` turns latents into per-head k_nope and v.
Keys are taken `key_chunk` tokens at a time (whole cache blocks, read through the block table), expanded,
and folded into an online softmax; queries are tiled so that one tile's float32 scores stay within
`score_bytes`. Memory is therefore bounded by the chunk sizes, not by heads x L x context (an 8K chunk
over an 8K context with 64 heads would be 16 GiB of scores). Query tiles that precede a key chunk
entirely are skipped, so causal masking costs no wasted work beyond the diagonal.
The reference is `kernels.mla_reference.mla_prefill_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2serve.kernels.latent_cache import dequantize, gather_blocks

KEY_CHUNK_TOKENS = 2048
SCORE_BYTES = 64 << 20


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence's prefill chunk: rows [start, end) of the step's tokens, after `context_len` cached ones."""

    start: int
    end: int
    context_len: int
    block_table: torch.Tensor  # [>= ceil((context_len + end - start) / block_size)] int64, on the cache's device


@dataclass
class _OnlineSoftmax:
    """Running row maxima, sums and unnormalised outputs of one query tile: [H, l], [H, l], [H, l, Dv]."""

    row_max: torch.Tensor
    row_sum: torch.Tensor
    out: torch.Tensor

    @classmethod
    def first(cls, scores: torch.Tensor, v: torch.Tensor) -> "_OnlineSoftmax":
        row_max = scores.amax(dim=-1)  # [H, l]
        probs = scores.sub_(row_max[..., None]).exp_()  # [H, l, n]
        return cls(row_max, probs.sum(dim=-1), torch.bmm(probs.to(v.dtype), v).float())

    def add(self, scores: torch.Tensor, v: torch.Tensor) -> None:
        """Fold in the scores [H, l, n] (rows with every key masked are -inf) of keys with values v [H, n, Dv]."""
        new_max = torch.maximum(self.row_max, scores.amax(dim=-1))  # finite: each row saw key 0 first
        rescale = torch.exp(self.row_max - new_max)
        probs = scores.sub_(new_max[..., None]).exp_()
        self.row_sum = self.row_sum * rescale + probs.sum(dim=-1)
        self.out = self.out * rescale[..., None] + torch.bmm(probs.to(v.dtype), v).float()
        self.row_max = new_max

    def result(self) -> torch.Tensor:
        return self.out / self.row_sum[..., None]  # [H, l, Dv]


def expand_latents(ctx: torch.Tensor, w_kv: torch.Tensor, nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache entries [..., n, Dl + Dr] -> keys [..., H, n, Dn + Dr] and values [..., H, n, Dv] per head."""
    heads, latent_dim = w_kv.shape[0], w_kv.shape[-1]
    kv = (ctx[..., :latent_dim] @ w_kv.reshape(-1, latent_dim).T).unflatten(-1, (heads, -1))  # [..., n, H, Dn + Dv]
    k_pe = ctx[..., None, latent_dim:].expand(*kv.shape[:-1], -1)  # [..., n, H, Dr]
    k = torch.cat([kv[..., :nope_dim], k_pe], dim=-1).transpose(-3, -2)  # [..., H, n, Dn + Dr]
    return k, kv[..., nope_dim:].transpose(-3, -2)


def _expand_keys(cache, block_table, k0: int, n: int, w_kv, nope_dim: int, kv_scale: float, dtype):
    """Keys [H, n, Dn + Dr] and values [H, n, Dv] of context tokens k0 .. k0 + n - 1."""
    block_size = cache.shape[1]
    blocks = block_table[k0 // block_size: -(-(k0 + n) // block_size)]
    ctx = dequantize(gather_blocks(cache, blocks), kv_scale, dtype).view(-1, cache.shape[-1])[:n]  # [n, D]
    return expand_latents(ctx, w_kv, nope_dim)


def _tile_scores(q_tile, k, sm_scale: float, q_pos0: int, k0: int) -> torch.Tensor:
    """Causally masked float32 scores [H, l, n] of a query tile whose first query sits at position q_pos0."""
    scores = torch.matmul(q_tile, k.transpose(1, 2)).float().mul_(sm_scale)  # [H, l, n]
    num_queries, n = scores.shape[1:]
    if k0 + n - 1 > q_pos0:  # some key lies after some query of the tile
        q_pos = torch.arange(q_pos0, q_pos0 + num_queries, device=scores.device)
        k_pos = torch.arange(k0, k0 + n, device=scores.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return scores


def mla_prefill(
    q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, context_len: int, w_kv: torch.Tensor,
    sm_scale: float, kv_scale: float = 1.0, key_chunk: int = KEY_CHUNK_TOKENS, score_bytes: int = SCORE_BYTES,
) -> torch.Tensor:
    """q [L, H, Dn + Dr] at positions context_len.. attending over cache [N, bs, Dl + Dr] through
    block_table, with w_kv [H, Dn + Dv, Dl] (kv_b_proj per head) -> [L, H, Dv] in q's dtype."""
    num_queries, heads, qk_dim = q.shape
    block_size, seq_len = cache.shape[1], context_len + num_queries
    nope_dim = qk_dim - (cache.shape[-1] - w_kv.shape[-1])
    chunk = -(-min(key_chunk, seq_len) // block_size) * block_size
    tile = max(1, min(num_queries, score_bytes // (4 * heads * chunk)))
    q_heads = q.transpose(0, 1)  # [H, L, Dn + Dr]
    states: list[_OnlineSoftmax | None] = [None] * -(-num_queries // tile)
    for k0 in range(0, seq_len, chunk):
        k, v = _expand_keys(cache, block_table, k0, min(chunk, seq_len - k0), w_kv, nope_dim, kv_scale, q.dtype)
        first_tile = max(0, k0 - context_len) // tile  # earlier tiles see none of these keys
        for t in range(first_tile, len(states)):
            q0 = t * tile
            scores = _tile_scores(q_heads[:, q0: q0 + tile], k, sm_scale, context_len + q0, k0)
            if states[t] is None:
                states[t] = _OnlineSoftmax.first(scores, v)
            else:
                states[t].add(scores, v)
    out = torch.cat([s.result() for s in states], dim=1)  # [H, L, Dv]
    return out.transpose(0, 1).to(q.dtype)
