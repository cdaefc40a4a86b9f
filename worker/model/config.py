"""ModelConfig: the DeepSeek-V3 / Kimi K2 architecture numbers, read from a checkpoint's config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling as K2 and DeepSeek-V3 publish it (docs/k2-format.md, Math)."""

    type: str = "yarn"
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RopeScaling | None":
        if not d:
            return None
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "rope_type" in d and "type" not in d:
            kwargs["type"] = d["rope_type"]
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepseekV3ForCausalLM checkpoint (Kimi K2 defaults)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    tie_word_embeddings: bool = False
    weight_block_size: tuple[int, int] | None = (128, 128)
    model_type: str = "kimi_k2"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token per layer in the MLA latent cache: latent + shared k_rope (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim ** -0.5 * m * m` with YaRN's mscale when rope_scaling is set (0.130861 for K2)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.factor > 1:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)} - {"rope_scaling", "weight_block_size"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in known and (v is not None or k == "q_lora_rank")}
        kwargs["rope_scaling"] = RopeScaling.from_dict(d.get("rope_scaling"))
        quant = d.get("quantization_config") or {}
        block = quant.get("weight_block_size")
        kwargs["weight_block_size"] = tuple(block) if block else None
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention magnitude: `0.1 * mscale * ln(factor) + 1` for factor > 1."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
