"""Weights per GPU under a layout, parameter counts and the MLA cache size: the planner's memory side.

Layout: a group of W ranks (the EP size) whose attention is tensor parallel over `tp` ranks, so the
group holds W / tp attention partitions (data parallel). Per GPU:
  attention       q_a_proj and kv_a_proj_with_mqa replicated (their outputs are the shared latents);
                  q_b_proj, kv_b_proj and o_proj split by head over tp
  dense MLP       (the first dense layer) split over tp: tensor parallel within the partition,
                  never over all W ranks; tp = 1 replicates it
  embed, lm_head  vocab-parallel over tp, likewise (replicated at tp = 1)
  shared expert   replicated (each rank runs its own tokens), or "tp": split over tp
  routed experts  split by expert over all W ranks
  norms, router   replicated
Weights follow the checkpoint: block-FP8 matrices plus one float32 scale per 128x128 block; embeddings,
lm_head, norms and the router gate in bf16; the router bias in fp32. Multi-token-prediction layers
are not counted (K2 has none; DeepSeek-V3's 671B also excludes its MTP module).

"Active" parameters = attention + dense MLP + shared experts + num_experts_per_tok routed experts per
MoE layer + embed_tokens + lm_head + norms + router gate (K2: 32.9B, DeepSeek-V3: 37.6B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from k2serve.worker.model.config import ModelConfig

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class WeightKind:
    """One kind of weight: its parameter count, bytes in the checkpoint, and bytes held per GPU."""

    name: str
    params: int
    bytes_total: int
    params_per_gpu: float
    bytes_per_gpu: float


def fp8_matrix_bytes(rows: int, cols: int, block: tuple[int, int]) -> int:
    """e4m3 data plus the float32 scale grid [ceil(rows/bn), ceil(cols/bk)]."""
    return rows * cols + FP32 * math.ceil(rows / block[0]) * math.ceil(cols / block[1])


def matrices_bytes(shapes: list[tuple[int, int]], model: ModelConfig) -> tuple[int, int]:
    """(params, bytes) of block-FP8 matrices (bf16 when the checkpoint is not quantized)."""
    params = sum(r * c for r, c in shapes)
    if model.weight_block_size is None:
        return params, BF16 * params
    return params, sum(fp8_matrix_bytes(r, c, model.weight_block_size) for r, c in shapes)


def attention_shapes(m: ModelConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per-layer MLA matrices as [out, in]: (replicated under TP, split by head under TP)."""
    heads = m.num_attention_heads
    kv_a = (m.kv_lora_rank + m.qk_rope_head_dim, m.hidden_size)
    kv_b = (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    o = (m.hidden_size, heads * m.v_head_dim)
    if m.q_lora_rank is None:
        return [kv_a], [(heads * m.qk_head_dim, m.hidden_size), kv_b, o]
    return [(m.q_lora_rank, m.hidden_size), kv_a], [(heads * m.qk_head_dim, m.q_lora_rank), kv_b, o]


def mlp_shapes(intermediate: int, hidden: int) -> list[tuple[int, int]]:
    """SwiGLU gate, up, down as [out, in]."""
    return [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def num_moe_layers(m: ModelConfig) -> int:
    return sum(m.is_moe_layer(i) for i in range(m.num_hidden_layers))


def expert_params_bytes(m: ModelConfig) -> tuple[int, int]:
    """(params, bytes) of one routed expert."""
    return matrices_bytes(mlp_shapes(m.moe_intermediate_size, m.hidden_size), m)


def _kind(name: str, params: int, nbytes: int, divisor: float) -> WeightKind:
    return WeightKind(name, params, nbytes, params / divisor, nbytes / divisor)


def weight_kinds(m: ModelConfig, num_gpus: int, tp: int, shared_experts: str = "replicated") -> tuple[WeightKind, ...]:
    """Parameters and bytes of each kind of weight, whole model and per GPU (see the module docstring)."""
    n_moe = num_moe_layers(m)
    layers, n_dense = m.num_hidden_layers, m.num_hidden_layers - n_moe
    rep_p, rep_b = matrices_bytes(attention_shapes(m)[0], m)
    split_p, split_b = matrices_bytes(attention_shapes(m)[1], m)
    dense_p, dense_b = matrices_bytes(mlp_shapes(m.intermediate_size, m.hidden_size), m)
    shared_p, shared_b = matrices_bytes(mlp_shapes(m.moe_intermediate_size * m.n_shared_experts, m.hidden_size), m)
    expert_p, expert_b = expert_params_bytes(m)
    embed_p = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    norm_p = layers * (2 * m.hidden_size + (m.q_lora_rank or 0) + m.kv_lora_rank) + m.hidden_size
    gate_p, bias_p = n_moe * m.n_routed_experts * m.hidden_size, n_moe * m.n_routed_experts
    routed = n_moe * m.n_routed_experts
    return (
        WeightKind("attention", layers * (rep_p + split_p), layers * (rep_b + split_b),
                   layers * (rep_p + split_p / tp), layers * (rep_b + split_b / tp)),
        _kind("dense_mlp", n_dense * dense_p, n_dense * dense_b, tp),
        _kind("shared_experts", n_moe * shared_p, n_moe * shared_b, 1 if shared_experts == "replicated" else tp),
        _kind("routed_experts", routed * expert_p, routed * expert_b, num_gpus),
        _kind("embed_lm_head", embed_p, BF16 * embed_p, tp),
        _kind("norms_router", norm_p + gate_p + bias_p, BF16 * (norm_p + gate_p) + FP32 * bias_p, 1),
    )


def kinds_by_name(kinds: tuple[WeightKind, ...]) -> dict[str, WeightKind]:
    return {k.name: k for k in kinds}


def active_params(m: ModelConfig) -> int:
    """Parameters one token touches (see the module docstring for the definition)."""
    kinds = kinds_by_name(weight_kinds(m, num_gpus=1, tp=1))
    routed = num_moe_layers(m) * m.num_experts_per_tok * expert_params_bytes(m)[0]
    return sum(k.params for name, k in kinds.items() if name != "routed_experts") + routed


def kv_bytes_per_token(m: ModelConfig, dtype_bytes: int = BF16) -> int:
    """MLA latent cache per token over all layers: (kv_lora_rank + qk_rope_head_dim) * layers * bytes."""
    return m.kv_cache_dim * m.num_hidden_layers * dtype_bytes


def activation_bytes_per_token(m: ModelConfig) -> int:
    """Workspace one prefill token needs: 8 hidden-sized bf16 buffers (residual, norm output, attention
    output, MoE output and their collective copies) plus the gate/up outputs of its k expert copies."""
    return BF16 * (8 * m.hidden_size + 2 * m.num_experts_per_tok * m.moe_intermediate_size)
