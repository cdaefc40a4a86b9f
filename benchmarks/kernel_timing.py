"""Timing for benchmarks/gpu_kernels.py: the timer, the measured device ceilings, and one timed case per
kernel at the given shapes. Kernels and torch are passed in or imported inside the functions, so that
gpu_kernels.py can set TRITON_INTERPRET before triton is first imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    bf16_tflops: float
    fp8_tflops: float | None


@dataclass(frozen=True)
class Row:
    """One timed case; `base_ms` is the torch bf16 baseline (None where there is none)."""

    kernel: str
    shape: str
    tokens: int
    ms: float
    base_ms: float | None
    flops: float
    bytes: float


def make_timer(device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: triton's do_bench (L2 flushed between calls, median) on CUDA,
    one wall-clock run elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall_ms(fn):  # the smoke run checks the plumbing, not speed: one call
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall_ms


def measure_ceilings(torch, device, timer, smoke: bool) -> Ceilings:
    """Device-to-device copy bandwidth (read + write) and square bf16 (and fp8) matmul throughput."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * nbytes / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16_tflops = 2 * n**3 / (timer(lambda: a @ b) * 1e-3) / 1e12
    return Ceilings(copy_gbps, bf16_tflops, _fp8_matmul_tflops(torch, a, b, timer) if device.type == "cuda" else None)


def _fp8_matmul_tflops(torch, a, b, timer) -> float | None:
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=a.device)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        fn()
        return 2 * a.shape[0] ** 3 / (timer(fn) * 1e-3) / 1e12
    except Exception as exc:  # an optional ceiling: report why it is missing, keep going
        print(f"  (fp8 _scaled_mm ceiling unavailable: {type(exc).__name__}: {exc})")
        return None


def time_quant(torch, device, shapes, timer, tokens) -> Row:
    from k2serve.kernels.fp8_quant import per_token_group_quant_fp8
    from k2serve.kernels.reference import per_token_group_quant_fp8_ref

    x = torch.randn(tokens, shapes.hidden, device=device, dtype=torch.bfloat16)
    ms = timer(lambda: per_token_group_quant_fp8(x))
    base = timer(lambda: per_token_group_quant_fp8_ref(x))
    nbytes = x.numel() * 3 + tokens * (shapes.hidden // 128) * 4  # read bf16, write e4m3 + scales
    return Row("fp8_quant", f"[T, {shapes.hidden}]", tokens, ms, base, 0.0, nbytes)


def time_gemms(torch, device, shapes, timer, tokens, name, n, k, weights) -> list[Row]:
    from k2serve.kernels.fp8_gemm import fp8_linear, w8a8_block_fp8_matmul
    from k2serve.kernels.fp8_quant import per_token_group_quant_fp8

    w, ws, w_bf16 = weights
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
    a, a_s = per_token_group_quant_fp8(x)
    base = timer(lambda: x @ w_bf16.T)
    flops = 2.0 * tokens * n * k
    gemm_bytes = n * k + tokens * k + tokens * n * 2 + ws.numel() * 4
    shape = f"{name} N={n} K={k}"
    return [
        Row("fp8_gemm", shape, tokens, timer(lambda: w8a8_block_fp8_matmul(a, a_s, w, ws)), base, flops, gemm_bytes),
        Row("fp8_linear", shape, tokens, timer(lambda: fp8_linear(x, w, ws)), base, flops, gemm_bytes + tokens * k * 2),
    ]


def torch_moe_baseline(torch, x, ids, weights, w13_bf16, w2_bf16):
    """The torch way: for each local expert with tokens, bf16 matmuls on dequantized weights."""
    local = ids.long()
    out = torch.zeros_like(x, dtype=torch.float32)
    in_range = (local >= 0) & (local < w13_bf16.shape[0])
    for e in torch.unique(local[in_range]).tolist():
        tok, slot = (local == e).nonzero(as_tuple=True)
        gate, up = (x[tok] @ w13_bf16[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2_bf16[e].T
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


def time_moe(torch, device, shapes, timer, tokens, experts, dense) -> Row:
    """One EP rank's expert work for a batch of `tokens`: the dispatcher hands it about
    tokens * top_k / ep_size token copies, each with one local expert id (weights applied later)."""
    from k2serve.kernels.fused_moe import fused_moe

    gen = torch.Generator(device=device).manual_seed(tokens)
    copies = max(1, tokens * shapes.top_k // shapes.ep_size)
    x = torch.randn(copies, shapes.hidden, device=device, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, shapes.n_local_experts, (copies, 1), device=device, generator=gen)
    weights = torch.ones(copies, 1, device=device)
    hit = torch.unique(ids).numel()
    ms = timer(lambda: fused_moe(x, ids, weights, *experts.as_args()))
    base = timer(lambda: torch_moe_baseline(torch, x, ids, weights, *dense))
    h, i = shapes.hidden, shapes.moe_inter
    nbytes = hit * 3 * h * i + copies * (h * 2 + h + 2 * i * 2 + i + h * 2 * 2)
    shape = (f"{copies} copies (T x top{shapes.top_k} / EP{shapes.ep_size}) on {shapes.n_local_experts} "
             f"experts, H={h} I={i}")
    return Row("fused_moe", shape, tokens, ms, base, 2.0 * copies * 3 * h * i, nbytes)
