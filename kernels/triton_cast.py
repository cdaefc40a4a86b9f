"""Interpreter-safe casts for Triton kernels.

The Triton CPU interpreter (TRITON_INTERPRET=1) rounds fp32 -> bf16 by truncation and loses the
mantissa carry when fp32 -> e4m3 rounds up into the next binade (124.3 becomes 64, not 128).
Compiled kernels use the hardware conversions, which are correct; under the interpreter we first round
in fp32 to a value the target format holds exactly, so the interpreter's cast has nothing left to round.
Kernels take an `INTERPRET` constexpr (from `is_interpreter()`) and store through `cast_for_store`.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

E4M3_MAX = 448.0


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (Triton's own TRITON_INTERPRET knob)."""
    knobs = getattr(triton, "knobs", None)  # triton < 3.4 has no knobs: read its variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def round_to_e4m3(x):
    """fp32 -> fp32 holding the nearest float8_e4m3fn value (ties to even, saturating at +-448)."""
    ax = tl.minimum(tl.abs(x), E4M3_MAX)
    exponent = (ax.to(tl.int32, bitcast=True) >> 23) - 127
    exponent = tl.maximum(exponent, -6)  # subnormals share the step of the smallest binade
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    t = ax / step  # exact: step is a power of two
    r = tl.floor(t + 0.5)
    is_odd_tie = ((r - t) == 0.5) & ((r.to(tl.int32) & 1) == 1)
    r = tl.where(is_odd_tie, r - 1.0, r)
    rounded = r * step
    is_negative = x.to(tl.int32, bitcast=True) < 0  # keeps -0.0
    return tl.where(is_negative, -rounded, rounded)


@triton.jit
def round_to_bf16(x):
    """fp32 -> fp32 holding the nearest bfloat16 value (ties to even)."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    bits = (bits + 0x7FFF + lsb) & -65536  # -65536 == 0xFFFF0000 as int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast fp32 `x` to `dtype` for a store; exact under the interpreter too."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            x = round_to_bf16(x)
        elif dtype == tl.float8e4nv:
            x = round_to_e4m3(x)
    return x.to(dtype)
