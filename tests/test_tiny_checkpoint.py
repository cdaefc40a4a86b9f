"""The tiny checkpoint is in K2's exact on-disk format (docs/architecture.md and docs/k2-format.md)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import regex
import torch
from safetensors import safe_open

from k2serve.cluster.tiny import (
    NUM_BASE_RANKS, PRESETS, make_tiny_model, tiny_config_dict,
)
from k2serve.cluster.tiny_tokenizer import TRAINING_CORPUS, train_bpe
from k2serve.kernels.block_fp8 import dequantize_block_fp8
from k2serve.router.text.tokenizer import K2_PAT_STR

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest's session checkpoint: make_tiny_model(..., seed=0)


def load_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def tensors(tiny_dir) -> dict[str, torch.Tensor]:
    return load_all(tiny_dir)


def test_files_present(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "tiktoken.model", "tokenizer_config.json", "chat_template.jinja",
    } <= names


def test_config_matches_k2_fields(tiny_dir):
    c = json.loads((tiny_dir / "config.json").read_text())
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "kimi_k2"
    assert (c["scoring_func"], c["topk_method"], c["n_group"], c["topk_group"]) == ("sigmoid", "noaux_tc", 1, 1)
    assert c["routed_scaling_factor"] == 2.827 and c["norm_topk_prob"] is True
    assert c["rope_theta"] == 50000.0 and c["num_nextn_predict_layers"] == 0
    assert c["rope_scaling"] == {
        "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    }
    assert c["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }
    assert c["vocab_size"] == 1280 and (c["bos_token_id"], c["eos_token_id"]) == (1024, 1025)
    assert c["tie_word_embeddings"] is False and c["torch_dtype"] == "bfloat16"
    assert c["max_position_embeddings"] == 131072 and c["rms_norm_eps"] == 1e-6
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1025, 1026] and gen["temperature"] == 0.6 and gen["max_length"] == 131072


def test_config_loads_into_model_config(tiny_dir):
    from k2serve.worker.model.config import ModelConfig

    mc = ModelConfig.from_dir(tiny_dir)
    assert mc.hidden_size == 192 and mc.kv_cache_dim == 144 and mc.weight_block_size == (128, 128)
    assert [mc.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_overrides_and_unknown_fields():
    v3 = tiny_config_dict(n_group=4, topk_group=2)
    assert (v3["n_group"], v3["topk_group"], v3["n_routed_experts"]) == (4, 2, 16)
    with pytest.raises(ValueError, match="unknown config fields"):
        tiny_config_dict(n_groups=4)


def expected_fp8_shapes() -> dict[str, tuple[int, int]]:
    shapes = {
        "self_attn.q_a_proj": (96, 192), "self_attn.q_b_proj": (192, 96),
        "self_attn.kv_a_proj_with_mqa": (144, 192), "self_attn.kv_b_proj": (256, 128),
        "self_attn.o_proj": (192, 128),
    }
    out = {f"model.layers.{i}.{k}": v for i in range(3) for k, v in shapes.items()}
    out.update({"model.layers.0.mlp.gate_proj": (320, 192), "model.layers.0.mlp.up_proj": (320, 192),
                "model.layers.0.mlp.down_proj": (192, 320)})
    for i in (1, 2):
        for expert in [f"experts.{e}" for e in range(16)] + ["shared_experts"]:
            out[f"model.layers.{i}.mlp.{expert}.gate_proj"] = (96, 192)
            out[f"model.layers.{i}.mlp.{expert}.up_proj"] = (96, 192)
            out[f"model.layers.{i}.mlp.{expert}.down_proj"] = (192, 96)
    return out


def test_fp8_matrices_and_scales(tensors):
    shapes = expected_fp8_shapes()
    for name, (rows, cols) in shapes.items():
        w, s = tensors[name + ".weight"], tensors[name + ".weight_scale_inv"]
        assert w.dtype == FP8 and tuple(w.shape) == (rows, cols), name
        assert s.dtype == torch.float32 and tuple(s.shape) == (-(-rows // 128), -(-cols // 128)), name
        assert bool((s > 0).all()), name
    fp8_names = {n for n, t in tensors.items() if t.dtype == FP8}
    assert fp8_names == {n + ".weight" for n in shapes}
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    assert tuple(tensors[kv_a + ".weight"].shape) == (144, 192)
    assert tuple(tensors[kv_a + ".weight_scale_inv"].shape) == (2, 2)  # partial blocks on both axes


def test_partial_blocks_dequantize_sanely(tensors):
    name = "model.layers.0.mlp.gate_proj"  # [320, 192]: a 64-row and a 64-column partial block
    w = dequantize_block_fp8(tensors[name + ".weight"], tensors[name + ".weight_scale_inv"])
    assert tuple(w.shape) == (320, 192)
    corner = w[256:, 128:].std().item() * 192 ** 0.5  # init std is in_features ** -0.5
    assert 0.8 < corner < 1.2  # the partial corner block carries real weights


def test_unquantized_tensors(tensors):
    bf16 = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(3):
        p = f"model.layers.{i}."
        bf16 += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "self_attn.q_a_layernorm.weight", p + "self_attn.kv_a_layernorm.weight"]
    bf16 += ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    for name in bf16:
        assert tensors[name].dtype == torch.bfloat16, name
    assert tuple(tensors["model.embed_tokens.weight"].shape) == (1280, 192)
    assert tuple(tensors["lm_head.weight"].shape) == (1280, 192)
    assert tuple(tensors["model.layers.1.mlp.gate.weight"].shape) == (16, 192)
    assert tuple(tensors["model.layers.0.self_attn.kv_a_layernorm.weight"].shape) == (128,)
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and tuple(bias.shape) == (16,) and bias.abs().max() > 0
    assert tensors["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == torch.float32
    assert not any(n.startswith("model.layers.3.") for n in tensors)
    assert "model.layers.0.mlp.gate.weight" not in tensors  # layer 0 is dense


def test_routing_is_not_degenerate(tensors):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 192, generator=gen)  # [T, H] ~ unit RMS like a normed hidden state
    w = tensors["model.layers.1.mlp.gate.weight"].float()
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    scores = torch.sigmoid(x @ w.T)  # [T, E]
    chosen = (scores + bias).topk(4, dim=-1).indices
    assert torch.bincount(chosen.flatten(), minlength=16).min() > 0  # every expert gets tokens
    assert not torch.equal(chosen, scores.topk(4, dim=-1).indices)  # the bias changes some selections


def test_index_total_size(tiny_dir, tensors):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(set(index["weight_map"].values())) == 2


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_seed_and_seeds_differ(tiny_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_dir)
    other = load_all(make_tiny_model(tmp_path / "other", seed=1))
    base = load_all(tiny_dir)
    assert not torch.equal(other["lm_head.weight"], base["lm_head.weight"])
    assert (tiny_dir / "tiktoken.model").read_bytes() == (tmp_path / "other" / "tiktoken.model").read_bytes()


def test_tiktoken_model_format(tiny_dir):
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == NUM_BASE_RANKS
    parsed = [(base64.b64decode(tok), int(rank)) for tok, rank in (line.split() for line in lines)]
    assert [rank for _, rank in parsed] == list(range(NUM_BASE_RANKS))
    assert [tok for tok, _ in parsed[:256]] == [bytes([b]) for b in range(256)]
    assert len({tok for tok, _ in parsed}) == NUM_BASE_RANKS


def test_bpe_merges_are_reachable_and_match_tiktoken():
    import tiktoken

    ranks = train_bpe(TRAINING_CORPUS, NUM_BASE_RANKS)
    for token, rank in ranks.items():  # every merged token splits into two lower-ranked tokens
        if len(token) > 1:
            assert any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                       for i in range(1, len(token))), token
    enc = tiktoken.Encoding("tiny", pat_str=K2_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    # tiktoken (Rust fancy-regex) and the trainer's `regex` V1 pre-split agree on K2's pattern
    pieces = regex.findall(regex.compile(K2_PAT_STR, flags=regex.V1), TRAINING_CORPUS)
    python_ids = [i for p in pieces for i in enc._encode_single_piece(p.encode())]
    assert enc.encode_ordinary(TRAINING_CORPUS) == python_ids
    assert len(python_ids) < len(TRAINING_CORPUS.encode()) / 3  # merges compress the training text


def test_config_overrides_shape_the_weights(tmp_path):
    path = make_tiny_model(tmp_path / "v3", seed=2, config_overrides=dict(
        n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=2.5))
    config = json.loads((path / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.5)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.gate_proj.weight" in index and "model.layers.1.mlp.gate.weight" not in index
    assert "model.layers.2.mlp.experts.15.down_proj.weight_scale_inv" in index


def test_mla_k2_widths_preset(tmp_path):
    """K2's real MLA widths (what vLLM's CPU MLA backend accepts), the other dimensions as in the tiny preset."""
    path = make_tiny_model(tmp_path / "mla", seed=0, preset="mla-k2-widths")
    config = json.loads((path / "config.json").read_text())
    widths = [config[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")]
    assert widths == [512, 64, 128, 128]
    assert {k: v for k, v in config.items() if k not in PRESETS["mla-k2-widths"]} == \
        {k: v for k, v in tiny_config_dict().items() if k not in PRESETS["mla-k2-widths"]}
    tensors = load_all(path)
    kv_a = tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert tuple(tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape) == (576, 192)
    assert tuple(kv_a.shape) == (5, 2)  # 576 = 4.5 blocks of 128 rows, as in K2
    assert tuple(tensors["model.layers.1.self_attn.kv_b_proj.weight"].shape) == (4 * 256, 512)
    assert tuple(tensors["model.layers.1.self_attn.o_proj.weight"].shape) == (192, 4 * 128)


def test_presets_and_overrides_combine(tmp_path):
    config = json.loads((make_tiny_model(tmp_path / "m", preset="mla-k2-widths",
                                         config_overrides=dict(num_hidden_layers=2)) / "config.json").read_text())
    assert (config["kv_lora_rank"], config["num_hidden_layers"]) == (512, 2)
    with pytest.raises(ValueError, match="unknown tiny model preset 'huge'.*mla-k2-widths"):
        make_tiny_model(tmp_path / "x", preset="huge")


def test_cli_offers_every_preset(tmp_path):
    from k2serve.cluster.cli import build_parser, main

    for preset in PRESETS:
        assert build_parser().parse_args(["make-tiny-model", "dir", "--preset", preset]).preset == preset
    assert main(["make-tiny-model", str(tmp_path / "cli"), "--preset", "mla-k2-widths"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["kv_lora_rank"] == 512
