"""FP8 and MLA attention kernels on one GPU: measured ceilings, correctness against the torch references,
then timings.

    python benchmarks/gpu_kernels.py            # on an H200: about 2-3 minutes, appends to RESULTS.md
    python benchmarks/gpu_kernels.py --dry-run  # anywhere: print the plan and exit

Shapes are Kimi K2's (hidden 7168, moe_intermediate 2048, 384 experts over 8 EP ranks = 48 local,
top-8): per-token-group quantization of [T, 7168]; the block-scaled GEMM at the shared expert's
gate+up [4096, 7168] and down [7168, 2048] weights; fused MoE for one EP rank (a batch of T tokens
sends it T * 8 / 8 = T token copies, each with one local expert id, as the dispatcher delivers them).
T = 1, 16, 64, 256 (decode) and 4096 (prefill). Baselines are torch bf16 matmuls on weights
dequantized beforehand. Percentages are of the measured bf16 matmul and copy-bandwidth ceilings
(FP8 tensor cores peak at twice bf16, so compute-bound FP8 kernels may exceed 100%).
MLA attention (benchmarks/attention_timing.py): the paged decode kernel at 8 or 64 local heads, cache
blocks of 64/16, batch 1..256, contexts 1K..128K, bf16 and FP8 caches, against the batched torch decode;
the chunked prefill of an 8K chunk.
`--cpu-smoke` runs the same code on tiny shapes under the Triton interpreter (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
from attention_timing import (
    K2_ATTENTION,
    SMOKE_ATTENTION,
    AttentionShapes,
    check_mla_decode,
    check_mla_prefill,
    plan_attention,
    time_mla_decode,
    time_mla_prefill,
)
from kernel_timing import (
    Ceilings,
    Row,
    make_timer,
    measure_ceilings,
    time_gemms,
    time_moe,
    time_quant,
)

DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TIME_BUDGET_S = 240.0  # stop starting new cases after this, so the run ends within 5 minutes


@dataclass(frozen=True)
class BenchShapes:
    """The model dimensions a run uses."""

    hidden: int
    moe_inter: int
    n_routed_experts: int
    ep_size: int
    top_k: int
    decode_tokens: tuple[int, ...]
    prefill_tokens: int

    @property
    def n_local_experts(self) -> int:
        return self.n_routed_experts // self.ep_size

    @property
    def token_counts(self) -> tuple[int, ...]:
        return (*self.decode_tokens, self.prefill_tokens)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (N, K) of the GEMM weights timed (the shared expert's two matmuls)."""
        return {"gate_up": (2 * self.moe_inter, self.hidden), "down": (self.hidden, self.moe_inter)}


K2_SHAPES = BenchShapes(7168, 2048, 384, 8, 8, (1, 16, 64, 256), 4096)
SMOKE_SHAPES = BenchShapes(256, 160, 8, 4, 2, (1,), 4)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


# ---------------------------------------------------------------- correctness


def _rel(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def check_quant(torch, device, shapes: BenchShapes) -> Check:
    from k2serve.kernels.fp8_quant import per_token_group_quant_fp8
    from k2serve.kernels.reference import E4M3_REL_ERR, E4M3_SUBNORMAL_ABS_ERR, dequantize_activation_ref
    from k2serve.kernels.reference import per_token_group_quant_fp8_ref

    x = torch.randn(37, shapes.hidden + 40, device=device, dtype=torch.bfloat16)  # a partial last group
    q, s = per_token_group_quant_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x)
    same = float((q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean())
    err = (dequantize_activation_ref(q, s) - x.float()).abs()
    sub = s.repeat_interleave(128, dim=1)[:, : x.shape[1]] * E4M3_SUBNORMAL_ABS_ERR
    in_bound = bool((err <= E4M3_REL_ERR * x.float().abs() * 1.0001 + sub).all())
    scales_ok = bool(torch.allclose(s, s_ref, rtol=1e-6, atol=0))
    # GPU division may differ from torch's by an ulp, flipping a rare rounding: allow 0.1% of elements.
    ok = in_bound and scales_ok and same >= 0.999
    return Check("fp8_quant", ok, f"bit-identical {same:.5f}, round-trip bound {in_bound}, scales {scales_ok}")


def check_gemm(torch, device, shapes: BenchShapes) -> Check:
    from k2serve.kernels.block_fp8 import dequantize_block_fp8
    from k2serve.kernels.fp8_gemm import w8a8_block_fp8_matmul
    from k2serve.kernels.reference import dequantize_activation_ref, gemm_error_bound, per_token_group_quant_fp8_ref
    from k2serve.kernels.testing import random_fp8_weight

    details, ok = [], True
    for m, (n, k) in ((1, (shapes.moe_inter + 72, shapes.hidden)), (45, (shapes.hidden, shapes.moe_inter + 40))):
        w, ws = random_fp8_weight(n, k, device, seed=m)
        a, a_s = per_token_group_quant_fp8_ref(torch.randn(m, k, device=device))
        y = w8a8_block_fp8_matmul(a, a_s, w, ws, out_dtype=torch.float32)
        a_f, w_f = dequantize_activation_ref(a, a_s), dequantize_block_fp8(w, ws)
        ref = a_f @ w_f.T
        # Hopper FP8 MMA keeps about 13 accumulator bits within a 128-wide chunk: 128 * 2^-13 = 2^-6.
        bound = gemm_error_bound(a_f, w_f, torch.float32, accumulation_error=2.0**-6)
        rel = _rel(y, ref)
        ok &= bool(((y - ref).abs() <= bound).all()) and rel < 1e-2
        details.append(f"M={m} N={n} K={k} rel {rel:.2e}")
    return Check("fp8_gemm", ok, "; ".join(details))


def check_moe(torch, device, shapes: BenchShapes, experts) -> Check:
    from k2serve.kernels.fused_moe import fused_moe
    from k2serve.kernels.reference import fused_moe_ref
    from k2serve.kernels.testing import random_routing

    t = 24
    x = torch.randn(t, shapes.hidden, device=device, dtype=torch.bfloat16)
    ids, weights = random_routing(t, shapes.top_k, shapes.n_local_experts * 2, seed=5, device=device)
    y = fused_moe(x, ids, weights, *experts.as_args())  # half the ids are not local
    emulated = fused_moe_ref(x, ids, weights, *experts.as_args())
    plain = fused_moe_ref(x, ids, weights, *experts.as_args(), quantize_activations=False)
    r1, r2 = _rel(y, emulated), _rel(y, plain)
    ok = bool(not y.isnan().any()) and r1 < 2e-2 and r2 < 2 * 2.0**-4
    return Check("fused_moe", ok, f"vs emulated reference {r1:.2e}, vs unquantized {r2:.2e}")


def _guarded_check(name: str, fn: Callable[[], Check]) -> Check:
    """Run a check; an exception (a compile error, say) is a failed check with its message."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        return Check(name, False, f"raised {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- report


def format_table(rows: list[Row], ceil: Ceilings) -> str:
    head = ("| kernel | shape | T | ms | torch bf16 ms | speedup | TFLOP/s | % bf16 peak | GB/s | % copy BW |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        tflops = r.flops / (r.ms * 1e-3) / 1e12
        gbps = r.bytes / (r.ms * 1e-3) / 1e9
        base = f"{r.base_ms:.4f}" if r.base_ms is not None else "-"
        speed = f"{r.base_ms / r.ms:.2f}x" if r.base_ms is not None else "-"
        flops_cols = f"{tflops:.1f} | {100 * tflops / ceil.bf16_tflops:.0f}%" if r.flops else "- | -"
        lines.append(f"| {r.kernel} | {r.shape} | {r.tokens} | {r.ms:.4f} | {base} | {speed} | {flops_cols} | "
                     f"{gbps:.0f} | {100 * gbps / ceil.copy_gbps:.0f}% |")
    return "\n".join(lines)


def format_report(card: str, versions: str, ceil: Ceilings, checks: list[Check], rows: list[Row], notes: list[str]) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fp8 = f", fp8 _scaled_mm {ceil.fp8_tflops:.0f} TFLOP/s" if ceil.fp8_tflops else ""
    parts = [f"## {stamp}, {card}", "", versions, "",
             f"Ceilings: copy {ceil.copy_gbps:.0f} GB/s, bf16 matmul {ceil.bf16_tflops:.0f} TFLOP/s{fp8}.", ""]
    parts += [f"- correctness {c.name}: {'ok' if c.ok else 'FAILED'} ({c.detail})" for c in checks]
    parts += ["", format_table(rows, ceil), ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the planned cases and exit (no GPU needed)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU under the Triton interpreter (exercises this script, times nothing real)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"append the report here (default {DEFAULT_RESULTS.relative_to(ROOT)} on CUDA, nothing otherwise)")
    p.add_argument("--budget-s", type=float, default=TIME_BUDGET_S, help="start no new case after this many seconds")
    return p.parse_args(argv)


def plan(shapes: BenchShapes, attention: AttentionShapes) -> list[str]:
    cases = [f"fp8_quant T={t}" for t in shapes.token_counts]
    cases += [f"fp8_gemm+fp8_linear {name} N={n} K={k} T={t}"
              for name, (n, k) in shapes.linear_shapes().items() for t in shapes.token_counts]
    return cases + [f"fused_moe T={t}" for t in shapes.token_counts] + plan_attention(attention)


def _attention_checks(torch, device, attention: AttentionShapes) -> list[tuple[str, Callable[[], Check]]]:
    return [(name, lambda name=name, fn=fn: Check(name, *fn(torch, device, attention)))
            for name, fn in (("mla_decode", check_mla_decode), ("mla_prefill", check_mla_prefill))]


def _attention_jobs(torch, device, attention: AttentionShapes, timer) -> list[tuple[str, Callable[[], list[Row]]]]:
    labels = plan_attention(attention)
    jobs = [(label, lambda case=case: [time_mla_decode(torch, device, attention, timer, case)])
            for label, case in zip(labels, attention.decode)]
    return jobs + [(label, lambda case=case: [time_mla_prefill(torch, device, attention, timer, case)])
                   for label, case in zip(labels[len(attention.decode):], attention.prefill)]


def run(torch, device, shapes: BenchShapes, budget_s: float,
        attention: AttentionShapes = K2_ATTENTION) -> tuple[Ceilings, list[Check], list[Row], list[str]]:
    """Ceilings, then every correctness check, then the timings."""
    from k2serve.kernels.block_fp8 import dequantize_block_fp8
    from k2serve.kernels.reference import dequantize_w13
    from k2serve.kernels.testing import random_fp8_experts, random_fp8_weight

    start, timer, notes = time.monotonic(), make_timer(device), []
    ceil = measure_ceilings(torch, device, timer, smoke=device.type != "cuda")
    experts = random_fp8_experts(shapes.n_local_experts, shapes.hidden, shapes.moe_inter, device)
    checks = [_guarded_check(name, fn) for name, fn in (
        ("fp8_quant", lambda: check_quant(torch, device, shapes)),
        ("fp8_gemm", lambda: check_gemm(torch, device, shapes)),
        ("fused_moe", lambda: check_moe(torch, device, shapes, experts)),
        *_attention_checks(torch, device, attention),
    )]
    # Kernels that failed their check are still timed (a one-shot GPU run should not come back empty)
    # but their rows are marked; the exit status reports the failure.
    jobs: list[tuple[str, Callable[[], list[Row]]]] = [
        (f"fp8_quant T={t}", lambda t=t: [time_quant(torch, device, shapes, timer, t)]) for t in shapes.token_counts]
    for name, (n, k) in shapes.linear_shapes().items():
        w, ws = random_fp8_weight(n, k, device, seed=n + k)
        weights = (w, ws, dequantize_block_fp8(w, ws, dtype=torch.bfloat16))
        jobs += [(f"gemm {name} T={t}", lambda t=t, name=name, n=n, k=k, weights=weights:
                  time_gemms(torch, device, shapes, timer, t, name, n, k, weights)) for t in shapes.token_counts]
    dense = (torch.stack([dequantize_w13(experts.w13_fp8[e], experts.w13_scale[e], (128, 128), torch.bfloat16)
                          for e in range(shapes.n_local_experts)]),
             torch.stack([dequantize_block_fp8(experts.w2_fp8[e], experts.w2_scale[e], dtype=torch.bfloat16)
                          for e in range(shapes.n_local_experts)]))
    jobs += [(f"fused_moe T={t}", lambda t=t: [time_moe(torch, device, shapes, timer, t, experts, dense)])
             for t in shapes.token_counts]
    jobs += _attention_jobs(torch, device, attention, timer)
    rows: list[Row] = []
    for label, job in jobs:
        if time.monotonic() - start > budget_s:
            notes.append(f"skipped {label}: time budget of {budget_s:.0f}s spent")
            continue
        print(f"  timing {label}", flush=True)
        try:
            rows += job()
        except Exception as exc:  # one failing case must not lose the others' results
            traceback.print_exc()
            notes.append(f"error in {label}: {type(exc).__name__}: {exc}")
    notes.append(f"total {time.monotonic() - start:.0f}s; GEMM block shapes autotuned per power-of-two M bucket; "
                 "times include the CPU launch overhead (no CUDA graphs)")
    return ceil, checks, _mark_failed(rows, checks), notes


# fp8_linear is quantization + GEMM; fused_moe also quantizes.
DEPENDS_ON = {"fp8_quant": {"fp8_quant"}, "fp8_gemm": {"fp8_gemm"}, "fp8_linear": {"fp8_quant", "fp8_gemm"},
              "fused_moe": {"fp8_quant", "fused_moe"}, "mla_decode": {"mla_decode"}, "mla_prefill": {"mla_prefill"}}


def _mark_failed(rows: list[Row], checks: list[Check]) -> list[Row]:
    failed = {c.name for c in checks if not c.ok}
    return [dataclasses.replace(r, kernel=f"{r.kernel} (check FAILED)") if DEPENDS_ON[r.kernel] & failed else r
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = SMOKE_SHAPES if args.cpu_smoke else K2_SHAPES
    attention = SMOKE_ATTENTION if args.cpu_smoke else K2_ATTENTION
    if args.dry_run:
        print("planned cases:\n  " + "\n  ".join(plan(shapes, attention)))
        return 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_kernels: CUDA is required (run on the H200); nothing measured. "
              "Use --dry-run or --cpu-smoke on a CPU machine.")
        return 1
    import triton

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    card = "CPU (Triton interpreter smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    ceil, checks, rows, notes = run(torch, device, shapes, args.budget_s, attention)
    report = format_report(card, versions, ceil, checks, rows, notes)
    print(report)
    target = args.results or (DEFAULT_RESULTS if device.type == "cuda" else None)
    if target is not None:
        with open(target, "a") as f:
            f.write("\n" + report)
        print(f"appended to {target}")
    return 0 if all(c.ok for c in checks) else 2


if __name__ == "__main__":
    sys.exit(main())
