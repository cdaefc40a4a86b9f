"""Why k2serve in bfloat16 is slower than in float32 on CPU: the engine's operators, timed in both dtypes.

    python benchmarks/dtype_ops.py [--threads 1] [--tokens 1,16,64] [--context 200]

At the mla-k2-widths model's shapes (hidden 192, 4 heads, latent 512 + rope 64, experts 96 wide, vocab
1280), for T tokens of a decode step over a context of --context tokens: each projection, the absorbed
MLA decode's matmuls, the padded cache gather, an RMSNorm and the dtype conversions the layers make.
Prints microseconds per call in float32 and bfloat16 and their ratio, and which bf16 matmul kernel
torch reports (oneDNN with AVX-512 BF16 or AMX computes bf16 natively; without them it converts).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, HEADS, LATENT, ROPE, NOPE, V, EXPERT, Q_LORA, VOCAB = 192, 4, 512, 64, 128, 128, 96, 96, 1280


def time_us(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Median of 5 batches of calls, microseconds per call."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds / 5 or n < 3:
        fn()
        n += 1
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        batches.append((time.perf_counter() - start) / n)
    return 1e6 * sorted(batches)[2]


def rms_normed(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)


def operators(t: int, s: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The step's operators at T tokens and context S, with inputs in `dtype`."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w_exp, w_kva = r(t, HIDDEN), r(EXPERT, HIDDEN), r(LATENT + ROPE, HIDDEN)
    w_qb, w_head = r(HEADS * 192, Q_LORA), r(VOCAB, HIDDEN)
    q_nope, w_uk, latent, q_lat = r(t, HEADS, NOPE), r(HEADS, NOPE, LATENT), r(t, s, LATENT), r(t, HEADS, LATENT)
    cache, slots = r(4096, LATENT + ROPE), torch.randint(0, 4096, (t, s), generator=g)
    probs, norm_w = r(t, HEADS, s), r(HIDDEN)
    return {
        "linear expert gate [T,192]x[96,192]": lambda: F.linear(x, w_exp),
        "linear kv_a [T,192]x[576,192]": lambda: F.linear(x, w_kva),
        "linear q_b [T,96]x[768,96]": lambda: F.linear(x[:, :Q_LORA], w_qb),
        "lm_head [T,192]x[1280,192]": lambda: F.linear(x, w_head),
        "absorb q: einsum bhd,hdc->bhc": lambda: torch.einsum("bhd,hdc->bhc", q_nope, w_uk),
        "scores: bmm [T,4,512]x[T,512,S]": lambda: torch.matmul(q_lat, latent.transpose(1, 2)),
        "values: bmm [T,4,S]x[T,S,512]": lambda: torch.matmul(probs, latent),
        "padded gather cache[slots] [T,S,576]": lambda: cache[slots],
        "RMSNorm (fp32 inside)": lambda: norm_w * rms_normed(x).to(dtype),
        "softmax over [T,4,S] in fp32": lambda: probs.float().softmax(-1).to(dtype),
        "silu(gate) * up [T,96]": lambda: F.silu(x[:, :EXPERT]) * x[:, :EXPERT],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="1,16,64")
    p.add_argument("--context", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"mkldnn bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {args.threads}\n")
    print("| T | operator | float32 us | bfloat16 us | bf16 / fp32 |\n|---|---|---|---|---|")
    for t in (int(v) for v in args.tokens.split(",")):
        fp32, bf16 = operators(t, args.context, torch.float32), operators(t, args.context, torch.bfloat16)
        for name in fp32:
            a, b = time_us(fp32[name]), time_us(bf16[name])
            print(f"| {t} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
