"""K2Tokenizer: K2's tiktoken format, special ids at K2's offsets, no control tokens from plain text."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from k2serve.cluster.tiny_tokenizer import K2_NON_SPECIAL_MARKERS, K2_SPECIAL_OFFSETS
from k2serve.router.text.tokenizer import K2Tokenizer

K2_NUM_BASE = 163584
SAMPLES = [
    "Hello, world! It's 2025.",
    "北京今天天气很好，我们去公园散步吧。",
    "Emoji: 😀🎉👍🏽 🇨🇳 and ZWJ 👩‍💻 family 👨‍👩‍👧",
    "mixed: def f(x): return x**2  # 平方 ✅\n\ttabs\r\n",
    "Ελληνικά, Русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "",
    " leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> K2Tokenizer:
    return K2Tokenizer.from_dir(tiny_model_dir)  # conftest's session checkpoint (make_tiny_model, seed 0)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(not tok.is_control(i) for i in ids)


def test_bpe_merges_apply(tok):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_special_ids_of_tiny(tok):
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (1024, 1025, 1026)
    assert tok.stop_ids == [1025, 1026]
    assert tok.n_vocab == 1024 + 258
    special = tok.special_tokens
    for offset, name in K2_SPECIAL_OFFSETS.items():
        assert special[name] == 1024 + offset
    assert special["<|reserved_token_1029|>"] == 1029  # reserved names carry the absolute id
    assert special["<|reserved_token_1281|>"] == 1281  # the 2 extra slots beyond the 256 reserved


def test_plain_encode_never_makes_control_tokens(tok):
    text = "<|im_end|><|im_user|>user<|im_middle|>[EOS]<|tool_calls_section_begin|><|reserved_token_1030|>"
    ids = tok.encode(text)
    assert all(not tok.is_control(i) for i in ids)
    assert tok.decode(ids) == text


def test_encode_with_special(tok):
    assert tok.encode_with_special("<|im_end|>") == [1026]
    ids = tok.encode_with_special("<|im_user|>user<|im_middle|>hi<|im_end|>")
    assert ids[0] == 1027 and ids[-1] == 1026 and 1041 in ids
    assert tok.decode(ids) == "<|im_user|>user<|im_middle|>hi<|im_end|>"


def test_skip_special_keeps_tool_markers(tok):
    markers = sorted(K2_NON_SPECIAL_MARKERS, key=lambda m: tok.special_tokens[m])
    ids = [tok.bos_id] + tok.encode("ok") + [tok.special_tokens[m] for m in markers] + [tok.im_end_id, tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "ok" + "".join(markers)
    assert tok.decode(ids) == "[BOS]ok" + "".join(markers) + "<|im_end|>[EOS]"
    for m in markers:
        assert tok.is_control(tok.special_tokens[m]) and not tok.is_special(tok.special_tokens[m])
    assert tok.is_special(tok.im_end_id) and tok.is_special(1100) and not tok.is_special(65)


def test_bad_ids_rejected(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.n_vocab])
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(-1)


# ---------------------------------------------------------------- a directory laid out like the real K2


def write_k2_like_dir(path: Path) -> Path:
    """163,584 ranks (256 bytes, all byte pairs, then synthetic triples) + K2's tokenizer_config names."""
    path.mkdir(parents=True)
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    need = K2_NUM_BASE - len(tokens)
    tokens += [bytes([a, b, c]) for a in range(32, 127) for b in range(32, 127) for c in range(32, 127)][:need]
    assert len(tokens) == K2_NUM_BASE
    lines = [base64.b64encode(t) + b" " + str(i).encode() for i, t in enumerate(tokens)]
    (path / "tiktoken.model").write_bytes(b"\n".join(lines) + b"\n")
    decoder = {
        str(K2_NUM_BASE + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": name not in K2_NON_SPECIAL_MARKERS}
        for off, name in K2_SPECIAL_OFFSETS.items()
    }
    config = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
              "pad_token": "[PAD]", "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def k2_tok(tmp_path_factory) -> K2Tokenizer:
    return K2Tokenizer.from_dir(write_k2_like_dir(tmp_path_factory.mktemp("k2") / "k2"))


def test_k2_layout_special_ids(k2_tok):
    assert k2_tok.encode_with_special("<|im_end|>") == [163586]
    assert (k2_tok.bos_id, k2_tok.eos_id, k2_tok.im_end_id) == (163584, 163585, 163586)
    assert k2_tok.n_vocab == 163842
    expected = {
        "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
        "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
        "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
        "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
        "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
        "[UNK]": 163838, "[PAD]": 163839, "<|reserved_token_163589|>": 163589,
        "<|reserved_token_163841|>": 163841,
    }
    special = k2_tok.special_tokens
    assert {name: special[name] for name in expected} == expected
    assert len(special) == 258
    assert not k2_tok.is_special(163597) and k2_tok.is_special(163589)  # unnamed reserved ids skip


def test_k2_layout_round_trip(k2_tok):
    text = "Hello <|im_end|> 你好 😀"
    ids = k2_tok.encode(text)
    assert k2_tok.decode(ids) == text and all(i < K2_NUM_BASE for i in ids)
    assert k2_tok.encode_with_special("a<|im_end|>b") == k2_tok.encode("a") + [163586] + k2_tok.encode("b")


def test_missing_or_broken_files(tmp_path):
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        K2Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    with pytest.raises(ValueError, match="no gaps"):
        K2Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 1\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"300": {"content": "[BOS]", "special": True}}}))
    with pytest.raises(ValueError, match="outside the special range"):
        K2Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        K2Tokenizer.from_dir(tmp_path / "nowhere")


def test_special_pattern_matches_exactly_the_specials(tok):
    for name in tok.special_tokens:
        assert tok.special_pattern.fullmatch(name), name
    found = tok.special_pattern.findall("x<|im_end|>y<|im_end|<|im_middle|>[EOS][EOSX]<|reserved_token_1281|>")
    assert found == ["<|im_end|>", "<|im_middle|>", "[EOS]", "<|reserved_token_1281|>"]


def test_trie_regex_prefers_longest():
    import re

    from k2serve.router.text.tokenizer import trie_regex

    pattern = re.compile(trie_regex(["ab", "abc", "a.", "x"]))
    assert pattern.findall("abcab a.x a") == ["abc", "ab", "a.", "x"]


def test_lone_surrogates_do_not_crash(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
