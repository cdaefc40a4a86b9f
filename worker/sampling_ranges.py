"""The usable range of every numeric sampling parameter: the one table SamplingParams.validate checks.

A value outside its range either means nothing (top_p 0, a negative min_tokens) or breaks float32
arithmetic in the sampler: a repetition_penalty of 1e-45 divides positive logits into infinities, the
softmax into NaN, and every step then samples token 0 (NUL text), as a vanishing temperature would
(temperatures below GREEDY_BELOW sample greedily instead). Within [0.01, 100] a repetition penalty already
forces or bans the tokens it touches; beyond it nothing changes but the risk of overflow.

Counts travel as int32 on the wire and the seed as int64, so their ranges stop there. A router rejects
the same values with a 400 in its API's format (the worker's in-stream 400 reaches the client as one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT32_MAX = 2 ** 31 - 1
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


@dataclass(frozen=True)
class Range:
    """[low, high], or (low, high] when `low_open`; only finite numbers (not bools) are ever inside."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        high = ", inf)" if math.isinf(self.high) else f", {_number(self.high)}]"
        return f"{'(' if self.low_open else '['}{_number(self.low)}{high}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(0.0, math.inf),
    "top_p": Range(0.0, 1.0, low_open=True),
    "top_k": Range(-1, INT32_MAX),  # -1 and 0 disable it
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(0.01, 100.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "max_tokens": Range(1, INT32_MAX),
    "min_tokens": Range(0, INT32_MAX),
    "seed": Range(INT64_MIN, INT64_MAX),
}
LOGIT_BIAS_RANGE = Range(-100.0, 100.0)


def out_of_range(name: str, value: float) -> str | None:
    """A message naming `name`'s usable range when `value` lies outside it, else None."""
    allowed = SAMPLING_RANGES[name]
    return None if value in allowed else f"{name} must be in {allowed}, got {value}"
