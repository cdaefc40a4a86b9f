"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2) over a paged latent cache.

The cache holds `[latent (kv_lora_rank) | k_rope (qk_rope_head_dim)]` per token. A sequence whose
step brings several tokens (a prefill chunk) uses the expanded form: `kv_b_proj` turns the cached
latents into per-head k_nope and v. A sequence bringing one token (decode) uses the absorbed form:
the k half of `kv_b_proj` is folded into q and attention runs over the latent cache directly; all
decodes of a step run as one padded batch. Heads are split across tensor-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.worker.model.attention_metadata import AttentionMetadata
from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.linear import ColumnParallelLinear, Fp8Weights, ReplicatedLinear, RowParallelLinear
from k2serve.worker.model.layers.norm import RMSNorm
from k2serve.worker.model.layers.rotary import RotaryEmbedding
from k2serve.worker.parallel import ParallelInfo


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, info: ParallelInfo, dtype: torch.dtype, reduce: str = "all",
                 fp8: Fp8Weights | None = None):
        super().__init__()
        c = config
        self.dtype = dtype
        self.n_local_heads = info.split(c.num_attention_heads, "num_attention_heads")
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim, self.kv_lora_rank = c.qk_head_dim, c.v_head_dim, c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        if c.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(c.hidden_size, c.num_attention_heads * c.qk_head_dim, info, dtype, fp8)
        else:
            self.q_a_proj = ReplicatedLinear(c.hidden_size, c.q_lora_rank, dtype, fp8)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, info, dtype, fp8)
        self.kv_a_proj_with_mqa = ReplicatedLinear(c.hidden_size, c.kv_cache_dim, dtype, fp8)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype)
        self.kv_b_proj = ColumnParallelLinear(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), info, dtype, fp8
        )
        self.o_proj = RowParallelLinear(c.num_attention_heads * c.v_head_dim, c.hidden_size, info, dtype, reduce, fp8)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.n_local_heads, self.qk_head_dim)  # [T, nh, 192]

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
        attn: AttentionMetadata, kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin = rotary.cos_sin(positions)
        q = self.project_q(x)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = rotary.apply(q_pe, cos, sin)  # [T, nh, 64]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        entry = torch.cat([self.kv_a_layernorm(latent), rotary.apply(k_pe, cos, sin)], dim=-1)  # [T, 576]
        cache = kv_cache.view(-1, kv_cache.shape[-1])
        cache[attn.slot_mapping] = entry.to(cache.dtype)
        out = x.new_empty(x.shape[0], self.n_local_heads, self.v_head_dim)  # [T, nh, 128]
        decodes = [i for i in range(attn.num_seqs) if attn.query_len(i) == 1]
        if decodes:
            self.decode_absorbed(q_nope, q_pe, attn, cache, decodes, out)
        for i in range(attn.num_seqs):
            if attn.query_len(i) > 1:
                self.prefill_expanded(q_nope, q_pe, attn, cache, i, out)
        return self.o_proj(out.flatten(1))

    def process_weights_after_loading(self) -> None:
        """Absorbed decode multiplies by kv_b_proj's halves directly: keep them dense (once, after loading)."""
        if self.kv_b_proj.fp8 is not None:
            self.register_buffer("kv_b_dense", self.kv_b_proj.dense_weight(self.dtype), persistent=False)

    def split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as W_UK [nh, 128, 512] and W_UV [nh, 128, 512]."""
        w = self.kv_b_dense if self.kv_b_proj.fp8 is not None else self.kv_b_proj.weight
        w = w.view(self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def prefill_expanded(self, q_nope, q_pe, attn: AttentionMetadata, cache, i: int, out) -> None:
        """Sequence i's chunk attends causally over its whole cached context with expanded k/v."""
        start, end = attn.query_start_loc[i], attn.query_start_loc[i + 1]
        ctx = cache[attn.cache_slots(i)].to(q_nope.dtype)  # [S, 576]
        latent, k_pe = ctx.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [S, nh, 128] each
        q = torch.cat([q_nope[start:end], q_pe[start:end]], dim=-1).transpose(0, 1)  # [nh, L, 192]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.n_local_heads, -1)], dim=-1).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)).float() * self.softmax_scale  # [nh, L, S]
        scores = scores + causal_mask(end - start, ctx.shape[0], attn.context_lens[i], scores.device)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out[start:end] = torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [L, nh, 128]

    def decode_absorbed(self, q_nope, q_pe, attn: AttentionMetadata, cache, seqs: list[int], out) -> None:
        """One query token per sequence, all at once, attending over the latent cache."""
        rows = torch.tensor([attn.query_start_loc[i] for i in seqs], dtype=torch.long, device=q_nope.device)
        lens = [attn.seq_len(i) for i in seqs]
        ctx, valid = gather_padded(cache, attn, seqs, lens)  # [B, S, 576], [B, S]
        ctx = ctx.to(q_nope.dtype)
        latent, k_pe = ctx.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        w_uk, w_uv = self.split_kv_b()
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope[rows], w_uk)  # [B, nh, 512]
        scores = torch.matmul(q_latent, latent.transpose(1, 2)) + torch.matmul(q_pe[rows], k_pe.transpose(1, 2))
        scores = scores.float() * self.softmax_scale  # [B, nh, S]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        o_latent = torch.matmul(probs, latent)  # [B, nh, 512]
        out[rows] = torch.einsum("bhc,hdc->bhd", o_latent, w_uv)  # [B, nh, 128]


def causal_mask(num_queries: int, num_keys: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[L, S] additive mask: query j (absolute position context_len + j) sees keys 0..context_len + j."""
    q_pos = torch.arange(num_queries, device=device)[:, None] + context_len
    k_pos = torch.arange(num_keys, device=device)[None, :]
    return torch.zeros(num_queries, num_keys, device=device).masked_fill(k_pos > q_pos, float("-inf"))


def gather_padded(cache: torch.Tensor, attn: AttentionMetadata, seqs: list[int], lens: list[int]):
    """Contexts of `seqs` from the flat cache, right-padded to the longest: [B, S, D] and a [B, S] mask."""
    max_len = max(lens)
    slots = attn.padded_slots[seqs, :max_len]  # [B, S]
    valid = torch.arange(max_len, device=slots.device)[None, :] < torch.tensor(lens, device=slots.device)[:, None]
    return cache[slots], valid
