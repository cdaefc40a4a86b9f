"""The tiny checkpoint's tokenizer in K2's format: a small byte-level BPE (tiktoken.model) trained on an
embedded corpus with K2's split pattern, tokenizer_config.json with K2's special-token names at K2's
offsets (the five tool-call markers `special: false`), and a chat template rendering K2's format.
"""

from __future__ import annotations

import base64
import heapq
import json
from pathlib import Path
from typing import Any

import regex

from k2serve.router.text.tokenizer import K2_PAT_STR

NUM_RESERVED_SPECIAL = 256  # named in tokenizer_config.json; the 2 extra slots are implied

K2_SPECIAL_OFFSETS: dict[int, str] = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    254: "[UNK]", 255: "[PAD]",
}
# HF "special": false, so skip_special_tokens keeps them (docs/k2-format.md, Tokenizer).
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


def write_tokenizer(out: Path, num_base_ranks: int) -> None:
    """tiktoken.model, tokenizer_config.json (with the chat template) and chat_template.jinja into `out`."""
    ranks = train_bpe(TRAINING_CORPUS, num_base_ranks)
    write_tiktoken_model(out / "tiktoken.model", ranks)
    config = json.dumps(tokenizer_config_dict(len(ranks)), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")
    (out / "chat_template.jinja").write_text(K2_CHAT_TEMPLATE, encoding="utf-8")
