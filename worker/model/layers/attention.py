"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2) over a paged latent cache.

The cache holds `[latent (kv_lora_rank) | k_rope (qk_rope_head_dim)]` per token (in the activation dtype
or FP8, `kernels.latent_cache`). A sequence whose step brings several tokens (a prefill chunk) uses the
expanded form: `kv_b_proj` turns the cached latents into per-head k_nope and v. A sequence bringing one
token (decode) uses the absorbed form: the k half of `kv_b_proj` is folded into q and attention runs over
the latent cache directly, all decodes of a step in one call. The attention itself is the step's
backend (`AttentionMetadata.backend`, chosen once per device), reading the cache in place through the
block tables. Heads are split across tensor-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.kernels import latent_cache
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
        latent_cache.store(kv_cache, attn.slot_mapping, entry, attn.kv_scale)
        out = x.new_empty(x.shape[0], self.n_local_heads, self.v_head_dim)  # [T, nh, 128]
        if attn.decode_rows is not None:
            self.decode_absorbed(q_nope, q_pe, attn, kv_cache, out)
        if attn.prefill_plan is not None:
            attn.backend.prefill(torch.cat([q_nope, q_pe], dim=-1), kv_cache, attn.prefill_plan, self.kv_b_weight(),
                                 self.softmax_scale, attn.kv_scale, out)
        return self.o_proj(out.flatten(1))

    def process_weights_after_loading(self) -> None:
        """Absorbed decode multiplies by kv_b_proj's halves directly: keep them dense (once, after loading)."""
        if self.kv_b_proj.fp8 is not None:
            self.register_buffer("kv_b_dense", self.kv_b_proj.dense_weight(self.dtype), persistent=False)

    def kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj per head, dense: [nh, 128 + 128, 512] (W_UK rows, then W_UV rows)."""
        w = self.kv_b_dense if self.kv_b_proj.fp8 is not None else self.kv_b_proj.weight
        return w.view(self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    def decode_absorbed(self, q_nope, q_pe, attn: AttentionMetadata, kv_cache, out) -> None:
        """Every decoding sequence's one query at once, over the latent cache: W_UK folded into q, W_UV
        applied to the attended latents."""
        w = self.kv_b_weight()
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]  # [nh, 128, 512] each
        rows = attn.decode_rows
        q_latent = torch.bmm(q_nope.index_select(0, rows).transpose(0, 1), w_uk).transpose(0, 1)  # [B, nh, 512]
        o_latent = attn.backend.decode(q_latent, q_pe.index_select(0, rows), kv_cache, attn.decode_plan,
                                       self.softmax_scale, attn.kv_scale)  # [B, nh, 512]
        out[rows] = torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, nh, 128]
