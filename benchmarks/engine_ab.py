"""A/B of engine throughput between two installs of k2serve (say main's venv and this checkout's), on the
workload of benchmarks/engine_vs_hf.py, without transformers.

On a shared box the load moves between runs, so a ratio against a baseline run at another moment drifts;
here each measurement is a fresh child process, the interpreters alternate, and the best of --repeats
counts for each. Besides wall-clock tokens/s it reports tokens per CPU-second of the process (torch on
--threads 1 thread): time spent waiting for a CPU that others hold does not count, so it is the steadier
figure when the box is loaded.

    python benchmarks/engine_ab.py --python /path/to/main/.venv/bin/python --concurrency 16,64 --repeats 4

The child uses only Engine.from_model_dir, EngineConfig, SamplingParams, make_tiny_model and
engine_vs_hf's workload (same prompts and output lengths, greedy, ignore_eos, float32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def measure(model_dir: str, concurrency: int, threads: int, max_tokens: int) -> dict:
    """In this process: output tokens/s of one engine run of the workload (after a warm-up) and its tokens."""
    import torch

    from engine_vs_hf import make_workload, run_engine
    from k2serve.worker.config import EngineConfig
    from k2serve.worker.engine import Engine

    torch.set_num_threads(threads)
    prompts, lengths = make_workload(concurrency, 16, max_tokens, 0)
    engine = Engine.from_model_dir(model_dir, EngineConfig(max_num_seqs=concurrency, max_model_len=1024,
                                                           num_kv_blocks=concurrency * 24 + 16,
                                                           max_num_batched_tokens=4096))
    run_engine(engine, prompts[:1], [2])
    cpu_start = time.process_time()
    outputs, seconds = run_engine(engine, prompts, lengths)
    cpu_seconds = time.process_time() - cpu_start
    return {"tok_s": sum(lengths) / seconds, "tok_cpu_s": sum(lengths) / cpu_seconds, "outputs": outputs}


def run_child(python: str, model_dir: str, concurrency: int, threads: int, max_tokens: int) -> dict:
    cmd = [python, __file__, "--child", "--model-dir", model_dir, "--concurrency", str(concurrency),
           "--threads", str(threads), "--max-tokens", str(max_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", help="the other interpreter (its installed k2serve is B); required")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh tiny one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model_dir, int(args.concurrency), args.threads, args.max_tokens)))
        return
    if not args.python:
        parser.error("--python is required: the interpreter whose k2serve to compare against")
    model_dir = args.model_dir or _tiny_model_dir()
    print("| concurrency | this checkout tok/s | other tok/s | this / other | this tok/CPU-s | other tok/CPU-s "
          "| this / other (CPU) | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        runs: dict[str, list[dict]] = {"a": [], "b": []}
        for _ in range(args.repeats):
            for side, python in (("a", sys.executable), ("b", args.python)):
                runs[side].append(run_child(python, model_dir, c, args.threads, args.max_tokens))
        wall = {side: max(r["tok_s"] for r in rs) for side, rs in runs.items()}
        cpu = {side: max(r["tok_cpu_s"] for r in rs) for side, rs in runs.items()}
        same = runs["a"][0]["outputs"] == runs["b"][0]["outputs"]
        print(f"| {c} | {wall['a']:.1f} | {wall['b']:.1f} | {wall['a'] / wall['b']:.2f}x | {cpu['a']:.1f} | "
              f"{cpu['b']:.1f} | {cpu['a'] / cpu['b']:.2f}x | {same} |", flush=True)


def _tiny_model_dir() -> str:
    from k2serve.cluster.tiny import make_tiny_model

    return str(make_tiny_model(tempfile.mkdtemp(prefix="k2serve-bench-"), seed=0))


if __name__ == "__main__":
    main()
