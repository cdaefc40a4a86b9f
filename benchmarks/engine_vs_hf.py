"""Side by side, CPU, float32, greedy: our Engine vs Hugging Face transformers' generate.

Same tiny K2 checkpoint (transformers gets our loader's dequantized weights, benchmarks/hf_reference.py),
same prompts, output lengths spread evenly from --min-tokens to --max-tokens (ignore_eos, so lengths are
exact). transformers runs each concurrency level as one left-padded batch with its own KV cache and must
decode until the longest request is done; tokens/s counts only the tokens the requests asked for, for both.
Each side runs --repeats times (alternating), best time kept.
Prints tokens/s and the ratio per concurrency, checks that the outputs agree, and ends with `ratio@64: X`.

    python benchmarks/engine_vs_hf.py [--model-dir DIR] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hf_reference import load_hf_model
from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.request import SamplingParams


def make_workload(n: int, min_tokens: int, max_tokens: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n prompts of 8..64 ordinary tokens and their output lengths, spread evenly in [min, max]."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (int(torch.randint(8, 65, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    if n == 1:
        return prompts, [max_tokens]
    lengths = [round(min_tokens + (max_tokens - min_tokens) * i / (n - 1)) for i in range(n)]
    return prompts, lengths


def run_engine(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], float]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return outputs, time.perf_counter() - start


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], lengths: list[int], pad_id: int) -> tuple[list[list[int]], float]:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [B, width] left padded
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, width]
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(lengths),
                         min_new_tokens=max(lengths), do_sample=False, pad_token_id=pad_id, eos_token_id=None,
                         use_cache=True)
    elapsed = time.perf_counter() - start
    return [row[width:width + n].tolist() for row, n in zip(out, lengths)], elapsed


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of requests whose tokens match exactly."""
    return sum(a == b for a, b in zip(ours, theirs)) / len(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh tiny one)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side; the best time counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or _tiny_model_dir()
    levels = [int(c) for c in args.concurrency.split(",")]
    hf = load_hf_model(model_dir)
    ratio = {}
    for c in levels:
        prompts, lengths = make_workload(c, args.min_tokens, args.max_tokens, args.seed)
        engine = Engine.from_model_dir(model_dir, EngineConfig(max_num_seqs=max(c, 1), max_model_len=1024,
                                                               num_kv_blocks=c * 24 + 16, max_num_batched_tokens=4096))
        run_engine(engine, prompts[:1], [2])  # warm up
        t_ours = t_hf = float("inf")
        for _ in range(args.repeats):  # alternate and keep the best: the box may be shared
            ours, t = run_engine(engine, prompts, lengths)
            t_ours = min(t_ours, t)
            theirs, t = run_hf(hf, prompts, lengths, pad_id=0)
            t_hf = min(t_hf, t)
        total = sum(lengths)
        ratio[c] = (total / t_ours) / (total / t_hf)
        print(f"concurrency {c:3d}: {total} tokens | engine {total / t_ours:8.1f} tok/s | "
              f"transformers {total / t_hf:8.1f} tok/s | ratio {ratio[c]:.2f}x | "
              f"outputs agree {agreement(ours, theirs):.0%}", flush=True)
    last = 64 if 64 in ratio else levels[-1]
    print(f"ratio@{last}: {ratio[last]:.2f}")


def _tiny_model_dir() -> str:
    from k2serve.cluster.tiny import make_tiny_model

    return str(make_tiny_model(tempfile.mkdtemp(prefix="k2serve-bench-"), seed=0))


if __name__ == "__main__":
    main()
