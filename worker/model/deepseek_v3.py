"""DeepseekV3ForCausalLM: the Kimi K2 / DeepSeek-V3 decoder over a paged MLA cache.

Per layer: `h = x + Attn(RMSNorm(x)); y = h + FFN(RMSNorm(h))`; final RMSNorm, then the untied
lm_head. With several ranks (docs/architecture.md) attention is head-parallel; in MoE layers o_proj
reduce-scatters into token shards, the residual stream stays sharded through the expert-parallel
FFN, and the shards are all-gathered before the next attention. Dense layers use a tensor-parallel
MLP with all-reduce. Parameter names match the checkpoint's.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.worker.model.attention_metadata import AttentionMetadata
from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.attention import MLAttention
from k2serve.worker.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from k2serve.worker.model.layers.linear import Fp8Weights
from k2serve.worker.model.layers.mlp import ParallelMLP
from k2serve.worker.model.layers.moe import MoE
from k2serve.worker.model.layers.norm import RMSNorm
from k2serve.worker.model.layers.rotary import RotaryEmbedding
from k2serve.worker.parallel import ParallelInfo, all_gather_tokens, shard_valid_rows, token_shard


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, info: ParallelInfo, dtype: torch.dtype, dispatcher: str,
        fp8: Fp8Weights | None,
    ):
        super().__init__()
        self.info = info
        self.is_moe = config.is_moe_layer(layer_idx)
        reduce = "scatter" if self.is_moe else "all"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = MLAttention(config, info, dtype, reduce, fp8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if self.is_moe:
            self.mlp = MoE(config, info, dtype, dispatcher, layer_idx, fp8)
        else:
            self.mlp = ParallelMLP(config.hidden_size, config.intermediate_size, info, dtype, fp8)

    def forward(self, x, positions, rotary, attn: AttentionMetadata, kv_cache) -> torch.Tensor:
        """x [T, H] (replicated on every rank) -> [T, H]."""
        attn_out = self.self_attn(self.input_layernorm(x), positions, rotary, attn, kv_cache)
        if not self.is_moe:
            h = x + attn_out
            return h + self.mlp(self.post_attention_layernorm(h))
        h = token_shard(x, self.info) + attn_out  # [T_pad / W, H]: this rank's tokens
        y = h + self.mlp(self.post_attention_layernorm(h), shard_valid_rows(x.shape[0], self.info))
        return all_gather_tokens(y, x.shape[0], self.info)


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig, info: ParallelInfo, dtype: torch.dtype, dispatcher: str, fp8):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, info, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, info, dtype, dispatcher, fp8) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids, positions, attn: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, attn, kv_cache)
        return self.norm(x)


class DeepseekV3ForCausalLM(nn.Module):
    """`forward` returns final hidden states [T, H]; `compute_logits` turns chosen rows into logits.

    `fp8` (chosen once, by device): keep the checkpoint's block-FP8 matrices and multiply them with that
    backend (Triton on GPU); None holds every matrix dense in `dtype` (CPU).
    """

    def __init__(
        self, config: ModelConfig, info: ParallelInfo = ParallelInfo(),
        dtype: torch.dtype = torch.float32, dispatcher: str = "all_to_all", fp8: Fp8Weights | None = None,
    ):
        super().__init__()
        self.config, self.info, self.dtype = config, info, dtype
        self.model = DeepseekV3Model(config, info, dtype, dispatcher, fp8)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, info, dtype)

    def forward(self, input_ids, positions, attn: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        if len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(f"got {len(kv_caches)} kv caches for {self.config.num_hidden_layers} layers")
        return self.model(input_ids, positions, attn, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] float32 (gathered on every rank)."""
        return self.lm_head(hidden)


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32,
                       device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """One [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] latent cache per layer, on `device`."""
    return [torch.zeros(num_blocks, block_size, config.kv_cache_dim, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)]
