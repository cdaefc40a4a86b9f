"""IncrementalDetokenizer never emits part of a UTF-8 character, whatever the token boundaries."""

from __future__ import annotations

import pytest

from k2serve.router.text.detokenizer import IncrementalDetokenizer
from k2serve.router.text.tokenizer import K2Tokenizer

TEXT = "aé你😀b👩‍💻ß€"


class ChunkTokenizer:
    """Token i is the i-th byte chunk given; 1000 is a special token, 1001 a kept tool marker."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def token_bytes(self, token_id: int) -> bytes:
        return {1000: b"[EOS]", 1001: b"<|tool_call_begin|>"}.get(token_id) or self.chunks[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id == 1000


def stream(detok: IncrementalDetokenizer, batches: list[list[int]]) -> list[str]:
    return [detok.push(batch) for batch in batches] + [detok.flush()]


def assert_whole_characters(deltas: list[str], expected: str) -> None:
    assert "".join(deltas) == expected
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("cut", range(1, len(TEXT.encode())))
def test_every_two_way_split(cut):
    data = TEXT.encode()
    tok = ChunkTokenizer([data[:cut], data[cut:]])
    deltas = stream(IncrementalDetokenizer(tok), [[0], [1]])
    assert_whole_characters(deltas, TEXT)
    assert deltas[0] == data[:cut].decode("utf-8", errors="ignore")  # emits what is complete, at once


def test_byte_at_a_time():
    data = TEXT.encode()
    tok = ChunkTokenizer([bytes([b]) for b in data])
    deltas = stream(IncrementalDetokenizer(tok), [[i] for i in range(len(data))])
    assert_whole_characters(deltas, TEXT)


def test_flush_replaces_incomplete_tail():
    tok = ChunkTokenizer(["é".encode()[:1], "😀".encode()[:3]])
    detok = IncrementalDetokenizer(tok)
    assert detok.push([0]) == ""
    assert detok.push([1]) == "\ufffd"  # é's lead byte was invalidated by a new lead byte
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_skip_special_tokens_keeps_tool_markers():
    tok = ChunkTokenizer([b"hi"])
    assert "".join(stream(IncrementalDetokenizer(tok, skip_special_tokens=True), [[0, 1000], [1001]])) == \
        "hi<|tool_call_begin|>"
    assert "".join(stream(IncrementalDetokenizer(tok), [[0, 1000]])) == "hi[EOS]"


def test_real_tokenizer_token_by_token(tiny_model_dir):
    tok = K2Tokenizer.from_dir(tiny_model_dir)
    text = "今天天气很好 😀🎉 naïve café ✅ 👩‍💻 done"
    ids = tok.encode(text)
    assert any(not tok.token_bytes(i).decode("utf-8", errors="ignore") for i in ids)  # some tokens split chars
    deltas = stream(IncrementalDetokenizer(tok), [[i] for i in ids + [tok.im_end_id]])
    assert_whole_characters(deltas, text + "<|im_end|>")
    skipped = stream(IncrementalDetokenizer(tok, skip_special_tokens=True), [ids[:3], ids[3:] + [tok.im_end_id]])
    assert_whole_characters(skipped, text)


def test_random_chunkings_property():
    from hypothesis import given, settings, strategies as st

    no_replacement_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd")

    @settings(max_examples=50, deadline=None)
    @given(st.text(no_replacement_char, max_size=30), st.lists(st.integers(min_value=1, max_value=6), max_size=40))
    def check(text, sizes):
        data, chunks, pos = text.encode("utf-8"), [], 0
        for size in sizes + [len(text.encode("utf-8")) + 1]:
            if pos >= len(data):
                break
            chunks.append(data[pos:pos + size])
            pos += size
        tok = ChunkTokenizer(chunks)
        deltas = stream(IncrementalDetokenizer(tok), [[i] for i in range(len(chunks))])
        assert_whole_characters(deltas, text)

    check()
