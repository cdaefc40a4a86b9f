"""The tiny checkpoint: a K2-shaped model small enough for a laptop, in K2's exact on-disk format.

`make_tiny_model(path, seed)` writes config.json, generation_config.json, two block-FP8 safetensors
shards with their index, and a K2-format tokenizer (tiktoken.model + tokenizer_config.json with K2's
special tokens and chat template). Same seed, same bytes. See DESIGN section 5 and K2-FACTS 1, 2, 4, 5.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors.torch import save_file

from kernels.block_fp8 import quantize_block_fp8
from router.tokenizer import K2_PAT_STR

NUM_BASE_RANKS = 1024
NUM_RESERVED_SPECIAL = 256  # named in tokenizer_config.json; the 2 extra slots are implied
NUM_SHARDS = 2

# Named special tokens at K2's offsets from the first special id (K2 id - 163584).
# Unnamed offsets are `<|reserved_token_{id}|>` with the ABSOLUTE id, as K2's tokenization_kimi.py names them.
K2_SPECIAL_OFFSETS: dict[int, str] = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    254: "[UNK]", 255: "[PAD]",
}
# HF "special": false, so skip_special_tokens keeps them (K2-FACTS section 4).
K2_NON_SPECIAL_MARKERS = frozenset({
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
})

K2_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{- part -}}{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and message.role != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- set role_name = message.name or message.role -%}
{%- if message.role == 'user' -%}
<|im_user|>{{ role_name }}<|im_middle|>
{%- elif message.role == 'assistant' -%}
<|im_assistant|>{{ role_name }}<|im_middle|>
{%- else -%}
<|im_system|>{{ role_name }}<|im_middle|>
{%- endif -%}
{%- if message.role == 'tool' -%}
## Return of {{ message.tool_call_id }}{{ '\\n' }}{{ render_content(message.content) }}
{%- else -%}
{{ render_content(message.content) }}
{%- if message.role == 'assistant' and message.tool_calls -%}
<|tool_calls_section_begin|>
{%- for tool_call in message.tool_calls -%}
<|tool_call_begin|>{{ tool_call.id }}<|tool_call_argument_begin|>
{%- if tool_call.function.arguments is string -%}
{{ tool_call.function.arguments }}
{%- else -%}
{{ tool_call.function.arguments | tojson }}
{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endif -%}
{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

# Training text for the tiny BPE: prose, code, numbers, Chinese, emoji, chat-like lines.
TRAINING_CORPUS = """\
The quick brown fox jumps over the lazy dog. It's a sunny day in Beijing, and we'll check the weather.
What's the weather like today? I don't know, but they're saying it will rain tomorrow afternoon.
Kimi is an AI assistant created by Moonshot AI. You are a helpful assistant; answer the user's question.
Large language models read tokens, not characters. A tokenizer splits text into pieces and merges bytes.
The serving system routes requests to worker groups, schedules batches, and streams tokens back.
Please call the function get_weather with the city name. The result was returned by the tool.
Mixture-of-experts layers send each token to a few experts; attention uses a compressed latent cache.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Scheduler:
    def __init__(self, config):
        self.config = config
        self.waiting = []
        self.running = []

    def schedule(self):
        for request in self.waiting:
            print(f"request {request.id} has {len(request.tokens)} tokens")
        return {"running": self.running, "waiting": self.waiting}

import json, os, sys
result = json.dumps({"city": "Beijing", "temperature": 23.5, "unit": "celsius"})
for i in range(10): total += i * 2 - 1  # comment: sum of values
if (x >= 0 && y <= 100) { return x + y; } else { return -1; }
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 7168 131072 163840 3.14159 2.827 1e-6 2025-07-11
Phone 555-0199, version 1.0.3, ratio 16:9, 50% off, $19.99, 12,345,678 items, 0x7f, 1/128.
今天天气很好，我们去公园散步吧。北京是中国的首都，上海是一个国际化的大城市。
人工智能正在改变世界。这个模型可以回答问题、编写代码和翻译文本。请用工具查询天气。
你好，我是Kimi，由月之暗面科技有限公司开发的人工智能助手。谢谢你的帮助！
Emoji time: 😀 😂 🎉 👍 🚀 ❤️ 🌟 🔥 ✅ 🤖 — done! Café, naïve, résumé, Ünïcödé, Ελληνικά, Русский текст.
<html><body><div class="main">Hello, world!</div></body></html>
{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help you today?"}
"""


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


def make_tiny_model(path: str | Path, seed: int = 0, config_overrides: dict[str, Any] | None = None) -> Path:
    """Write a K2-format checkpoint with random weights to `path` (created if needed); deterministic in `seed`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config_dict(**(config_overrides or {}))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    write_weights(out, config, seed)
    ranks = train_bpe(TRAINING_CORPUS, NUM_BASE_RANKS)
    write_tiktoken_model(out / "tiktoken.model", ranks)
    _write_json(out / "tokenizer_config.json", tokenizer_config_dict(len(ranks)))
    (out / "chat_template.jinja").write_text(K2_CHAT_TEMPLATE, encoding="utf-8")
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


def train_bpe(text: str, num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 single bytes (rank = byte value), then merges learned on `text`.

    Pre-splits with K2's pattern; merges the most frequent adjacent pair (ties: smallest bytes) until
    `num_ranks` tokens exist. A merge whose bytes already exist is applied without a new rank.
    """
    pattern = regex.compile(K2_PAT_STR, flags=regex.V1)
    counts: dict[bytes, int] = {}
    for piece in pattern.findall(text):
        counts[piece.encode("utf-8")] = counts.get(piece.encode("utf-8"), 0) + 1
    words = [[bytes([b]) for b in word] for word in counts]
    freqs = list(counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    trainer = _PairCounter(words, freqs)
    while len(ranks) < num_ranks:
        pair = trainer.best_pair()
        if pair is None:
            raise ValueError(f"training corpus too small: only {len(ranks)} of {num_ranks} ranks learned")
        ranks.setdefault(pair[0] + pair[1], len(ranks))
        trainer.merge(pair)
    return ranks


class _PairCounter:
    """Adjacent-pair counts over the distinct pre-tokenized words, updated incrementally per merge."""

    def __init__(self, words: list[list[bytes]], freqs: list[int]) -> None:
        self.words, self.freqs = words, freqs
        self.counts: dict[tuple[bytes, bytes], int] = {}
        self.where: dict[tuple[bytes, bytes], set[int]] = {}
        self.heap: list[tuple[int, bytes, bytes]] = []
        for i in range(len(words)):
            self._add_word(i, +1)

    def _add_word(self, i: int, sign: int) -> None:
        word, freq = self.words[i], self.freqs[i]
        for pair in zip(word, word[1:]):
            self.counts[pair] = self.counts.get(pair, 0) + sign * freq
            self.where.setdefault(pair, set()).add(i)
            if self.counts[pair] > 0:  # stale heap entries are skipped in best_pair
                heapq.heappush(self.heap, (-self.counts[pair], pair[0], pair[1]))

    def best_pair(self) -> tuple[bytes, bytes] | None:
        while self.heap:
            neg, left, right = heapq.heappop(self.heap)
            if self.counts.get((left, right), 0) == -neg:
                return left, right
        return None

    def merge(self, pair: tuple[bytes, bytes]) -> None:
        merged = pair[0] + pair[1]
        for i in sorted(self.where.pop(pair, ())):
            self._add_word(i, -1)
            self.words[i] = _merge_word(self.words[i], pair, merged)
            self._add_word(i, +1)
        self.counts.pop(pair, None)


def _merge_word(word: list[bytes], pair: tuple[bytes, bytes], merged: bytes) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_tiktoken_model(path: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken.model: one `base64(token_bytes) rank` line per token, in rank order."""
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def special_token_names(num_base: int) -> dict[int, str]:
    """Id -> name of the 256 reserved special ids after the base ranks, named as in K2 (absolute-id reserved names)."""
    return {
        num_base + off: K2_SPECIAL_OFFSETS.get(off, f"<|reserved_token_{num_base + off}|>")
        for off in range(NUM_RESERVED_SPECIAL)
    }


def tokenizer_config_dict(num_base: int) -> dict[str, Any]:
    """tokenizer_config.json as in Kimi-K2-Instruct, for `num_base` BPE ranks."""
    decoder = {
        str(token_id): {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": name not in K2_NON_SPECIAL_MARKERS,
        }
        for token_id, name in special_token_names(num_base).items()
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
            "[EOT]", "<|im_system|>", "<|im_middle|>",
        ],
        "bos_token": "[BOS]",
        "chat_template": K2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
