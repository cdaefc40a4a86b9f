"""Peak memory and time of one long prefill through the Engine (CPU, tiny K2 checkpoint).

Each measurement runs in a fresh child process: it builds the engine with a token budget that takes the
whole prompt in one chunk, notes its peak resident memory (ru_maxrss), prefills one prompt of --tokens
tokens (one output token) and reports how far the peak rose. `--python` adds interpreters whose
installed k2serve is measured too, one child each, alternating over --repeats, so that two checkouts
(say main's venv and this one) compare side by side:

    python benchmarks/prefill_memory.py --tokens 8192 --python /path/to/other/.venv/bin/python

The child uses only Engine.from_model_dir, EngineConfig, SamplingParams and make_tiny_model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def measure(model_dir: str, tokens: int, threads: int) -> dict:
    """In this process: the peak-RSS rise (MiB) and seconds of one `tokens`-token prefill."""
    import torch

    from k2serve.worker.config import EngineConfig
    from k2serve.worker.engine import Engine
    from k2serve.worker.request import SamplingParams

    torch.set_num_threads(threads)
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=tokens, max_model_len=tokens + 16,
                          num_kv_blocks=tokens // 16 + 4)
    engine = Engine.from_model_dir(model_dir, config)
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=1))  # warm up
    prompt = torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rise_mib": (after - before) / 1024, "seconds": seconds}


def run_child(python: str, model_dir: str, tokens: int, threads: int) -> dict:
    cmd = [python, __file__, "--child", "--model-dir", model_dir, "--tokens", str(tokens), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--python", action="append", default=[], help="another interpreter to measure (repeatable)")
    parser.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh tiny one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model_dir, args.tokens, args.threads)))
        return
    model_dir = args.model_dir or _tiny_model_dir()
    pythons = [sys.executable, *args.python]
    results: dict[str, list[dict]] = {p: [] for p in pythons}
    for _ in range(args.repeats):
        for python in pythons:
            results[python].append(run_child(python, model_dir, args.tokens, args.threads))
    print(f"| interpreter | prompt tokens | peak RSS rise (MiB) | prefill s (best of {args.repeats}) |")
    print("|---|---:|---:|---:|")
    for python, runs in results.items():
        peak = max(r["peak_rise_mib"] for r in runs)
        print(f"| {python} | {args.tokens} | {peak:.0f} | {min(r['seconds'] for r in runs):.2f} |")


def _tiny_model_dir() -> str:
    from k2serve.cluster.tiny import make_tiny_model

    return str(make_tiny_model(tempfile.mkdtemp(prefix="k2serve-bench-"), seed=0))


if __name__ == "__main__":
    main()
