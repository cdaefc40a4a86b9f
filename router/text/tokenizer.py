"""K2Tokenizer: Kimi K2's tiktoken tokenizer, built from a checkpoint directory without remote code.

K2 ships `tiktoken.model` (`base64(token_bytes) rank` lines, rank = id) and `tokenizer_config.json`
(special tokens in `added_tokens_decoder`). As K2's own tokenization_kimi.py does, the special ids are
`num_base + offset` for offsets 0..257 (256 reserved slots plus 2, so K2's tiktoken n_vocab is 163,842
while the model has 163,840 rows); an id not named in `added_tokens_decoder` is
`<|reserved_token_{id}|>` (absolute id). See docs/k2-format.md, Tokenizer.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Iterable

import tiktoken

# K2's pre-tokenizer split pattern, verbatim from tokenization_kimi.py (tiktoken/fancy-regex syntax).
K2_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL = 256
NUM_SPECIAL_SLOTS = NUM_RESERVED_SPECIAL + 2  # as tokenization_kimi.py: range(num_base, num_base + 256 + 2)
IM_END = "<|im_end|>"


class K2Tokenizer:
    """Text <-> token ids for K2. `encode` never produces control tokens; `encode_with_special` does."""

    def __init__(
        self, ranks: dict[bytes, int], special_names: dict[int, str], special_flags: dict[int, bool],
        bos_token: str = "[BOS]", eos_token: str = "[EOS]", name: str = "k2",
    ) -> None:
        self.num_base = _check_dense_ranks(ranks)
        self._special_tokens = _invert_unique(special_names)
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=K2_PAT_STR, mergeable_ranks=ranks, special_tokens=self._special_tokens,
        )
        self._token_bytes: list[bytes] = [b""] * self._encoding.n_vocab
        for token, rank in ranks.items():
            self._token_bytes[rank] = token
        for token_id, text in special_names.items():
            self._token_bytes[token_id] = text.encode("utf-8")
        self._skippable = [False] * self.num_base + [special_flags.get(i, True) for i in sorted(special_names)]
        self.bos_id = self._require(bos_token)
        self.eos_id = self._require(eos_token)
        self.im_end_id = self._require(IM_END)
        # Matches any control-token text; trie-shaped, since a 258-way alternation is tried branch by branch.
        self.special_pattern: re.Pattern[str] = re.compile(trie_regex(self._special_tokens))

    @classmethod
    def from_dir(cls, path: str | Path) -> "K2Tokenizer":
        """Load `tiktoken.model` and `tokenizer_config.json` from a K2-format checkpoint directory."""
        path = Path(path)
        ranks = read_tiktoken_model(path / "tiktoken.model")
        config_path = path / "tokenizer_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: K2 tokenizers need it for their special tokens")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        names, flags = special_tokens_from_config(config, num_base=len(ranks))
        return cls(
            ranks, names, flags, bos_token=_token_content(config.get("bos_token"), "[BOS]"),
            eos_token=_token_content(config.get("eos_token"), "[EOS]"), name=f"k2:{path.name}",
        )

    def _require(self, name: str) -> int:
        if name not in self._special_tokens:
            raise ValueError(f"special token {name!r} is not defined by tokenizer_config.json")
        return self._special_tokens[name]

    @property
    def n_vocab(self) -> int:
        """Number of token ids (base ranks + 258 special slots); may exceed the model's vocab_size by 2."""
        return self._encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every control token's text -> id (named and reserved)."""
        return dict(self._special_tokens)

    @property
    def stop_ids(self) -> list[int]:
        """Chat turns end with `<|im_end|>`; stop on it and on `[EOS]` (docs/k2-format.md)."""
        return [self.eos_id, self.im_end_id]

    def is_control(self, token_id: int) -> bool:
        """True for every id in the special range (including the five tool-call markers)."""
        return self.num_base <= token_id < self.n_vocab

    def is_special(self, token_id: int) -> bool:
        """HF's `special` flag: True for control tokens that `skip_special_tokens` drops.

        False for ordinary tokens and for K2's five tool-call markers, which are control tokens
        marked `"special": false` so that skipping special tokens keeps tool calls parseable.
        """
        return self._skippable[self._check_id(token_id)]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Marker text such as `<|im_end|>` is encoded as ordinary bytes, never as a control token."""
        return self._encoding.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids with marker text turned into control tokens. Only for text the chat template itself produced."""
        return self._encoding.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text (invalid UTF-8 becomes U+FFFD). Skipping keeps the tool-call markers."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Ids -> the raw bytes they stand for (a token may end inside a UTF-8 character)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"token id {bad} is out of range [0, {self.n_vocab})")
        if skip_special_tokens:
            ids = [i for i in ids if not self._skippable[i]]
        return self._encoding.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a control token's bytes are its marker text)."""
        return self._token_bytes[self._check_id(token_id)]

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is out of range [0, {len(self._token_bytes)})")
        return token_id


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """Parse `base64(token_bytes) rank` lines into {token_bytes: rank}."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a K2 checkpoint carries its BPE ranks in tiktoken.model")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}") from exc
    return ranks


def special_tokens_from_config(config: dict[str, Any], num_base: int) -> tuple[dict[int, str], dict[int, bool]]:
    """Names and HF `special` flags of ids num_base .. num_base+257 from `added_tokens_decoder`."""
    decoder = {int(k): v for k, v in config.get("added_tokens_decoder", {}).items()}
    outside = sorted(i for i in decoder if not num_base <= i < num_base + NUM_SPECIAL_SLOTS)
    if outside:
        raise ValueError(
            f"added_tokens_decoder ids {outside[:5]} lie outside the special range "
            f"[{num_base}, {num_base + NUM_SPECIAL_SLOTS}) that follows {num_base} BPE ranks"
        )
    names = {i: decoder[i]["content"] if i in decoder else f"<|reserved_token_{i}|>"
             for i in range(num_base, num_base + NUM_SPECIAL_SLOTS)}
    flags = {i: bool(decoder[i].get("special", True)) for i in decoder}
    return names, flags


def trie_regex(words: Iterable[str]) -> str:
    """A regex matching exactly `words`, longest first, shaped as a trie (shared prefixes matched once)."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}
    return _trie_node_regex(trie)


def _trie_node_regex(node: dict[str, dict]) -> str:
    branches = [re.escape(ch) + _trie_node_regex(child) for ch, child in sorted(node.items()) if ch]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in node else body


def _check_dense_ranks(ranks: dict[bytes, int]) -> int:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"tiktoken ranks must be exactly 0..{len(ranks) - 1} with no gaps or duplicates")
    return len(ranks)


def _invert_unique(names: dict[int, str]) -> dict[str, int]:
    inverted = {name: token_id for token_id, name in names.items()}
    if len(inverted) != len(names):
        dupes = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
        raise ValueError(f"special token names must be unique, duplicated: {dupes}")
    return inverted


def _token_content(value: Any, default: str) -> str:
    """tokenizer_config.json stores a token as a string or as an AddedToken dict with `content`."""
    if value is None:
        return default
    return value["content"] if isinstance(value, dict) else str(value)
