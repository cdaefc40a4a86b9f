"""IncrementalDetokenizer: streamed token ids -> text deltas that never split a UTF-8 character.

A byte-level BPE token may end in the middle of a multi-byte character (docs/k2-format.md, Tokenizer), so
detokenization works on bytes: complete characters are emitted as soon as they are whole, an
incomplete tail is held back until the next tokens complete it, and `flush` ends the stream.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Protocol


class ByteTokenizer(Protocol):
    """What the detokenizer needs (router.tokenizer.K2Tokenizer provides it)."""

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


class IncrementalDetokenizer:
    """One per streamed sequence: `push` each batch of new ids, then `flush` once at the end."""

    def __init__(self, tokenizer: ByteTokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The incremental UTF-8 decoder holds an incomplete trailing sequence until it completes and
        # replaces invalid bytes in the middle with U+FFFD, exactly what a stream needs.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Iterable[int]) -> str:
        """Add new token ids; return only the text they complete (possibly empty)."""
        data = b"".join(
            self._tokenizer.token_bytes(i) for i in token_ids
            if not (self._skip_special_tokens and self._tokenizer.is_special(i))
        )
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: emit held-back bytes, an incomplete character becoming U+FFFD."""
        return self._decoder.decode(b"", final=True)
