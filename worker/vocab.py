"""Vocab: token bytes and special ids of a K2-format checkpoint, read without the router's tokenizer.

Reads `tiktoken.model` (lines `base64(token bytes) rank`), `tokenizer_config.json`
(`added_tokens_decoder`: id -> content, special flag) and `generation_config.json` / `config.json` (eos
ids). Used for stop ids and for xgrammar's TokenizerInfo (structured output).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

IM_END = "<|im_end|>"
TOOL_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
TOOL_MARKERS = (TOOL_SECTION_BEGIN, TOOL_SECTION_END, TOOL_CALL_BEGIN, TOOL_ARGUMENT_BEGIN, TOOL_CALL_END)


@dataclass(frozen=True)
class Vocab:
    """Per-id token bytes (b"" for rows without a token) and the added tokens by name.

    `added` maps added-token content (e.g. "<|im_end|>") to its id; `special_ids` are the added tokens
    flagged special (control tokens); the tool-call markers are added but not special in K2.
    """

    token_bytes: tuple[bytes, ...]
    added: dict[str, int] = field(default_factory=dict)
    special_ids: frozenset[int] = frozenset()
    eos_token_ids: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    def id_of(self, name: str) -> int:
        """Id of an added token by its content; KeyError naming the token if absent."""
        if name not in self.added:
            raise KeyError(f"token {name!r} is not in this checkpoint's added tokens")
        return self.added[name]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The model's default stop ids: eos id(s) and <|im_end|> (K2 ends turns with it)."""
        ids = list(self.eos_token_ids)
        if IM_END in self.added and self.added[IM_END] not in ids:
            ids.append(self.added[IM_END])
        return tuple(ids)

    @property
    def has_tool_markers(self) -> bool:
        return all(m in self.added for m in TOOL_MARKERS)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, vocab_size: int | None = None) -> "Vocab":
        """Read the checkpoint's tokenizer files; `vocab_size` (the model's rows) sets the table length."""
        d = Path(model_dir)
        ranks = _read_tiktoken(d / "tiktoken.model")
        added, special = _read_added_tokens(d / "tokenizer_config.json")
        size = vocab_size or max([len(ranks), *[i + 1 for i in added.values()]])
        table = [b""] * size
        for rank, token in enumerate(ranks):
            if rank < size:
                table[rank] = token
        for name, token_id in added.items():
            if token_id < size:
                table[token_id] = name.encode("utf-8")
        return cls(tuple(table), added, frozenset(special), _read_eos_ids(d))


def _read_tiktoken(path: Path) -> list[bytes]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a K2-format checkpoint needs tiktoken.model")
    tokens: dict[int, bytes] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            tokens[int(rank)] = base64.b64decode(b64)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: expected 'base64 rank', got {line!r}") from e
    return [tokens.get(i, b"") for i in range(max(tokens) + 1 if tokens else 0)]


def _read_added_tokens(path: Path) -> tuple[dict[str, int], set[int]]:
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    added, special = {}, set()
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        added[entry["content"]] = int(token_id)
        if entry.get("special", True):
            special.add(int(token_id))
    return added, special


def _read_eos_ids(d: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = d / name
        if path.exists():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            for token_id in (eos if isinstance(eos, list) else [eos] if eos is not None else []):
                if token_id not in ids:
                    ids.append(int(token_id))
    return tuple(ids)
