"""StopStringMatcher: stop strings applied to streamed text."""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Text safe to emit now; after a match, the text before it (and `matched` is set)."""
        if not self.stops:
            return text
        self._buffer += text
        hit = min(((self._buffer.find(s), s) for s in self.stops if s in self._buffer), default=None)
        if hit is not None:
            self.matched = hit[1]
            out, self._buffer = self._buffer[:hit[0]], ""
            return out
        cut = max(len(self._buffer) - self._hold, 0)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
