"""The tiny checkpoint: a K2-shaped model small enough for a laptop, in K2's exact on-disk format.

`make_tiny_model(path, seed)` writes config.json, generation_config.json, two block-FP8 safetensors
shards with their index, and a K2-format tokenizer (tiktoken.model + tokenizer_config.json with K2's
special tokens and chat template). Same seed, same bytes. See docs/architecture.md (The tiny checkpoint)
and docs/k2-format.md.

Presets name shapes (config overrides): "tiny" (the default, every dimension small) and "mla-k2-widths"
(K2's real MLA widths, everything else tiny). The second is what other engines can load too: vLLM's
CPU MLA backend, for one, supports only the 576-wide latent of kv_lora_rank 512 + qk_rope_head_dim 64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from k2serve.cluster.tiny_tokenizer import NUM_RESERVED_SPECIAL, write_tokenizer
from k2serve.kernels.block_fp8 import quantize_block_fp8

NUM_BASE_RANKS = 1024
NUM_SHARDS = 2

# Named shapes for `k2serve make-tiny-model --preset`: config overrides on top of tiny_config_dict's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "mla-k2-widths": {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128},
}

# Named special tokens at K2's offsets from the first special id (K2 id - 163584).
# Unnamed offsets are `<|reserved_token_{id}|>` with the ABSOLUTE id, as K2's tokenization_kimi.py names them.
def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """config.json of the tiny model: every Kimi-K2-Instruct field, tiny dimensions; `overrides` replace fields."""
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": NUM_BASE_RANKS + 0,
        "eos_token_id": NUM_BASE_RANKS + 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 192,
        "initializer_range": 0.02,
        "intermediate_size": 320,
        "kv_lora_rank": 128,
        "max_position_embeddings": 131072,
        "model_type": "kimi_k2",
        "moe_intermediate_size": 96,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": 96,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": NUM_BASE_RANKS + NUM_RESERVED_SPECIAL,
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    return config


def preset_overrides(preset: str) -> dict[str, Any]:
    """The config overrides a preset names; ValueError naming the presets for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[preset])


def make_tiny_model(path: str | Path, seed: int = 0, config_overrides: dict[str, Any] | None = None,
                    preset: str = "tiny") -> Path:
    """Write a K2-format checkpoint with random weights to `path` (created if needed); deterministic in `seed`.

    The config is the preset's shape with `config_overrides` applied on top.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config_dict(**(preset_overrides(preset) | (config_overrides or {})))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    write_weights(out, config, seed)
    write_tokenizer(out, NUM_BASE_RANKS)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    im_end = config["bos_token_id"] + 2
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], im_end],
        "max_length": config["max_position_embeddings"],
        "temperature": 0.6,
        "transformers_version": config["transformers_version"],
    }


# ---------------------------------------------------------------- weights


def checkpoint_tensors(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name, in K2's dtypes (fp8 + `_scale_inv`, bf16, fp32 bias)."""
    gen = torch.Generator().manual_seed(seed)
    h = config["hidden_size"]
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _normal(gen, (config["vocab_size"], h), 1.0)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors.update(_attention_tensors(gen, config, prefix + "self_attn."))
        tensors[prefix + "input_layernorm.weight"] = _norm_weight(gen, h)
        tensors[prefix + "post_attention_layernorm.weight"] = _norm_weight(gen, h)
        if _is_moe_layer(config, layer):
            tensors.update(_moe_tensors(gen, config, prefix + "mlp."))
        else:
            tensors.update(_mlp_tensors(gen, h, config["intermediate_size"], prefix + "mlp."))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = _inv_freq(config)
    tensors["model.norm.weight"] = _norm_weight(gen, h)
    tensors["lm_head.weight"] = _normal(gen, (config["vocab_size"], h), h ** -0.5)
    return tensors


def _is_moe_layer(config: dict[str, Any], layer: int) -> bool:
    return (
        config["n_routed_experts"] > 0
        and layer >= config["first_k_dense_replace"]
        and layer % config["moe_layer_freq"] == 0
    )


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _norm_weight(gen: torch.Generator, size: int) -> torch.Tensor:
    return (1.0 + 0.05 * torch.randn(size, generator=gen)).to(torch.bfloat16)  # [size]


def _fp8_linear(gen: torch.Generator, name: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """A block-FP8 projection: e4m3 `weight` [out, in] and float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)].

    std = in_features ** -0.5 keeps unit-RMS inputs at unit RMS: attention is sharp enough for RoPE and
    masking errors to show in the logits, and every sublayer moves the residual stream measurably.
    """
    dense = torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5  # [out, in]
    weight, scale_inv = quantize_block_fp8(dense)
    return {f"{name}.weight": weight, f"{name}.weight_scale_inv": scale_inv}


def _attention_tensors(gen: torch.Generator, c: dict[str, Any], p: str) -> dict[str, torch.Tensor]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    t: dict[str, torch.Tensor] = {}
    t.update(_fp8_linear(gen, p + "q_a_proj", c["q_lora_rank"], h))
    t[p + "q_a_layernorm.weight"] = _norm_weight(gen, c["q_lora_rank"])
    t.update(_fp8_linear(gen, p + "q_b_proj", heads * qk_head, c["q_lora_rank"]))
    t.update(_fp8_linear(gen, p + "kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h))
    t[p + "kv_a_layernorm.weight"] = _norm_weight(gen, c["kv_lora_rank"])
    t.update(_fp8_linear(gen, p + "kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]))
    t.update(_fp8_linear(gen, p + "o_proj", h, heads * c["v_head_dim"]))
    return t


def _mlp_tensors(gen: torch.Generator, hidden: int, inter: int, p: str) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    t.update(_fp8_linear(gen, p + "gate_proj", inter, hidden))
    t.update(_fp8_linear(gen, p + "up_proj", inter, hidden))
    t.update(_fp8_linear(gen, p + "down_proj", hidden, inter))
    return t


def _moe_tensors(gen: torch.Generator, c: dict[str, Any], p: str) -> dict[str, torch.Tensor]:
    h, n_experts, inter = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    # std 0.1 gives router logits of std ~1.4 on unit-RMS input: sigmoid scores spread out, routing not degenerate;
    # the bias (std 0.05) is comparable to score gaps, so it changes some selections.
    t = {p + "gate.weight": _normal(gen, (n_experts, h), 0.1)}  # [E, H] bf16
    t[p + "gate.e_score_correction_bias"] = torch.randn(n_experts, generator=gen) * 0.05  # [E] fp32
    for e in range(n_experts):
        t.update(_mlp_tensors(gen, h, inter, f"{p}experts.{e}."))
    t.update(_mlp_tensors(gen, h, inter * c["n_shared_experts"], p + "shared_experts."))
    return t


def _inv_freq(c: dict[str, Any]) -> torch.Tensor:
    dim = c["qk_rope_head_dim"]
    return 1.0 / (c["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]


def write_weights(out: Path, config: dict[str, Any], seed: int, num_shards: int = NUM_SHARDS) -> None:
    """Write the tensors as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`."""
    tensors = checkpoint_tensors(config, seed)
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        shard_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {n: tensors[n].contiguous() for n in names[i * per_shard:(i + 1) * per_shard]}
        save_file(shard, str(out / shard_name), metadata={"format": "pt"})
        weight_map.update({n: shard_name for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------- tokenizer


