"""A "K2-width slice": Kimi K2's real layer widths in a few layers, with random block-FP8 weights written as
a K2-format checkpoint (config.json, safetensors shards + index, the tiny tokenizer), so the loader, the
engine and the FP8 kernels run at K2's shapes on one GPU.

K2_SLICE keeps K2's hidden size 7168, 64 heads, q_lora 1536 / kv_lora 512 / rope 64 / nope 128 / v 128,
the dense MLP's 18432, moe_intermediate 2048 and 384 experts top-8, in 2 layers (layer 0 dense, layer 1
MoE, as K2's first two). The vocabulary is the tiny tokenizer's (1,280 rows instead of 163,840): the
embedding and lm_head are not what the slice measures. SMOKE_SLICE is the same structure at tiny widths.

Weights are generated on the device: each matrix is e4m3 values drawn from N(0, 1) with one scale for
all its 128x128 blocks (in_features^-1/2), so dequantized weights keep unit-RMS activations at unit RMS.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from k2serve.cluster.tiny import NUM_BASE_RANKS, tiny_config_dict
from k2serve.cluster.tiny_tokenizer import write_tokenizer
from k2serve.kernels.block_fp8 import FP8_DTYPE, block_scale_shape

K2_SLICE = dict(hidden_size=7168, num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536,
                kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384, num_experts_per_tok=8,
                num_hidden_layers=2, first_k_dense_replace=1)
SMOKE_SLICE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                   kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                   intermediate_size=384, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                   num_hidden_layers=2, first_k_dense_replace=1)
MAX_SHARD_BYTES = 2 << 30


def slice_config(widths: dict[str, Any]) -> dict[str, Any]:
    """config.json of a slice: the tiny model's (K2's routing, YaRN, FP8 quantization config) with `widths`."""
    return tiny_config_dict(**widths)


def fp8_matrix(name: str, rows: int, cols: int, device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """`name.weight` e4m3 [rows, cols] and its `weight_scale_inv` (one value: cols^-1/2), made on `device`."""
    weight = torch.randn(rows, cols, device=device, generator=gen).clamp_(-448, 448).to(FP8_DTYPE)
    scale = torch.full(block_scale_shape((rows, cols)), cols ** -0.5, device=device)
    return {f"{name}.weight": weight, f"{name}.weight_scale_inv": scale}


def mlp(prefix: str, hidden: int, inter: int, device, gen) -> dict[str, torch.Tensor]:
    out = {}
    for proj, (rows, cols) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        out.update(fp8_matrix(f"{prefix}.{proj}", rows, cols, device, gen))
    return out


def attention(prefix: str, c: dict[str, Any], device, gen) -> dict[str, torch.Tensor]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = fp8_matrix(f"{prefix}.q_a_proj", c["q_lora_rank"], h, device, gen)
    out.update(fp8_matrix(f"{prefix}.q_b_proj", heads * qk_head, c["q_lora_rank"], device, gen))
    out.update(fp8_matrix(f"{prefix}.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h, device, gen))
    out.update(fp8_matrix(f"{prefix}.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"],
                          device, gen))
    out.update(fp8_matrix(f"{prefix}.o_proj", h, heads * c["v_head_dim"], device, gen))
    out[f"{prefix}.q_a_layernorm.weight"] = torch.ones(c["q_lora_rank"], dtype=torch.bfloat16, device=device)
    out[f"{prefix}.kv_a_layernorm.weight"] = torch.ones(c["kv_lora_rank"], dtype=torch.bfloat16, device=device)
    return out


def layer_parts(i: int, c: dict[str, Any], device, gen) -> Iterator[dict[str, torch.Tensor]]:
    """Layer i's tensors in parts of at most about MAX_SHARD_BYTES (a MoE layer's experts in groups)."""
    p, h = f"model.layers.{i}", c["hidden_size"]
    part = attention(f"{p}.self_attn", c, device, gen)
    part[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
    part[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
    if i < c["first_k_dense_replace"]:
        part.update(mlp(f"{p}.mlp", h, c["intermediate_size"], device, gen))
        yield part
        return
    e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    part[f"{p}.mlp.gate.weight"] = (torch.randn(e, h, device=device, generator=gen) * 1.4 / math.sqrt(h)).bfloat16()
    part[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(e, device=device, generator=gen) * 0.05
    part.update(mlp(f"{p}.mlp.shared_experts", h, inter * c["n_shared_experts"], device, gen))
    yield part
    per_part = max(1, MAX_SHARD_BYTES // (3 * h * inter))
    for first in range(0, e, per_part):
        part = {}
        for j in range(first, min(e, first + per_part)):
            part.update(mlp(f"{p}.mlp.experts.{j}", h, inter, device, gen))
        yield part


def model_parts(c: dict[str, Any], device, gen) -> Iterator[dict[str, torch.Tensor]]:
    h, v = c["hidden_size"], c["vocab_size"]
    yield {"model.embed_tokens.weight": torch.randn(v, h, device=device, generator=gen).bfloat16(),
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=device),
           "lm_head.weight": (torch.randn(v, h, device=device, generator=gen) * h ** -0.5).bfloat16()}
    for i in range(c["num_hidden_layers"]):
        yield from layer_parts(i, c, device, gen)


def write_slice_checkpoint(path: Path, widths: dict[str, Any], device: torch.device, seed: int = 0) -> Path:
    """Write the slice to `path` (one safetensors shard per part, generated on `device` part by part)."""
    path.mkdir(parents=True, exist_ok=True)
    config = slice_config(widths)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = [config["eos_token_id"], config["bos_token_id"] + 2]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}) + "\n")
    write_tokenizer(path, NUM_BASE_RANKS)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for n, part in enumerate(model_parts(config, device, gen)):
        shard = f"model-{n + 1:05d}.safetensors"
        save_file({k: t.cpu().contiguous() for k, t in part.items()}, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")
    return path
