"""`k2serve bench`: drive an OpenAI-compatible endpoint, print a table, write JSON and PNG plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from tqdm import tqdm

from k2serve.cluster.bench import BenchConfig, LengthDist, RequestResult, discover_model, load_prompts, run_bench


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="load-test an OpenAI-compatible endpoint (streaming)",
                              description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", default="", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8, help="max requests in flight (0 = unbounded)")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests/s")
    p.add_argument("--input-len", default="128", help="prompt words: N or LOW:HIGH (uniform)")
    p.add_argument("--output-len", default="128", help="max_tokens: N or LOW:HIGH (uniform)")
    p.add_argument("--prompts-file", help="JSONL with 'prompt' or 'messages' (and optional 'max_tokens')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to connect and between streamed data (a long generation is not cut)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/SGLang extension)")
    p.add_argument("--min-tokens", action="store_true", help="send min_tokens = max_tokens (fixed output length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--return-token-ids", action="store_true",
                   help="send return_token_ids (vLLM extension; a server started with --skip-tokenizer-init streams no text)")
    p.add_argument("--sweep", help="comma-separated concurrencies, e.g. 1,2,4,8 (one run each)")
    p.add_argument("--output", help="write the report (and per-request results) as JSON")
    p.add_argument("--plot-dir", help="write PNG plots into this directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace, concurrency: int | None) -> BenchConfig:
    prompts = load_prompts(args.prompts_file) if args.prompts_file else ()
    model = args.model or discover_model(args.base_url, args.api_key)
    return BenchConfig(
        base_url=args.base_url, model=model, endpoint=args.endpoint, num_requests=args.num_requests,
        concurrency=concurrency or None, request_rate=args.request_rate,
        input_len=LengthDist.parse(args.input_len), output_len=LengthDist.parse(args.output_len),
        prompts=prompts, seed=args.seed,
        slo_ttft_s=None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3,
        slo_tpot_s=None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3,
        timeout_s=args.timeout, api_key=args.api_key, ignore_eos=args.ignore_eos,
        force_min_tokens=args.min_tokens, temperature=args.temperature, return_token_ids=args.return_token_ids,
    )


def parse_sweep(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"--sweep {text!r}: concurrencies must be >= 1")
    return values


def run(args: argparse.Namespace) -> int:
    """Entry point of `k2serve bench`; exit status 1 when every request failed."""
    try:
        levels = parse_sweep(args.sweep, args.concurrency)
        runs = [bench_one(config_from_args(args, c), args.no_progress) for c in levels]
    except (ValueError, OSError, aiohttp.ClientError) as e:
        print(f"k2serve bench: {e}", file=sys.stderr)
        return 2
    for summary, _ in runs:
        print_summary(summary, sys.stdout)
    if len(runs) > 1:
        print_sweep([s for s, _ in runs], sys.stdout)
    if args.output:
        write_json(args.output, runs)
    if args.plot_dir:
        plot_runs(runs, Path(args.plot_dir))
    return 0 if any(s["completed"] for s, _ in runs) else 1


def bench_one(cfg: BenchConfig, quiet: bool) -> tuple[dict[str, Any], list[RequestResult]]:
    label = f"concurrency {cfg.concurrency or 'inf'}"
    with tqdm(total=cfg.num_requests, desc=label, file=sys.stderr, disable=quiet) as bar:
        return run_bench(cfg, bar)


def write_json(path: str, runs: list[tuple[dict[str, Any], list[RequestResult]]]) -> None:
    doc = [dict(summary, requests=[dataclasses.asdict(r) for r in results]) for summary, results in runs]
    Path(path).write_text(json.dumps(doc[0] if len(doc) == 1 else {"runs": doc}, indent=2))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def print_summary(s: dict[str, Any], out: TextIO) -> None:
    """The report as a table: counts and throughputs, then latency statistics in ms."""
    out.write(f"== {s['endpoint']}  model={s['model']}  concurrency={s['concurrency'] or 'inf'}  "
              f"rate={s['request_rate'] or 'inf'} req/s ==\n")
    for key in ("num_requests", "completed", "failed", "errors_by_kind", "duration_s", "total_input_tokens",
                "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
                "slo_ttft_ms", "slo_tpot_ms", "goodput"):
        value = s[key] if key != "errors_by_kind" else (", ".join(f"{k}: {v}" for k, v in s[key].items()) or "none")
        out.write(f"{key:<24}{_fmt(value)}\n")
    out.write(f"{'latency (ms)':<10}" + "".join(f"{c:>10}" for c in ("mean", "p50", "p90", "p99")) + "\n")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        row = [s[metric][k] for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")]
        out.write(f"{metric:<10}" + "".join(f"{_fmt(v):>10}" for v in row) + "\n")
    out.write("\n")


def print_sweep(summaries: list[dict[str, Any]], out: TextIO) -> None:
    out.write(f"{'concurrency':>12}{'req/s':>10}{'out tok/s':>12}{'goodput':>10}{'p99 ttft':>10}"
              f"{'p99 tpot':>10}{'p99 e2e':>10}{'failed':>8}\n")
    for s in summaries:
        out.write(f"{_fmt(s['concurrency']):>12}{_fmt(s['request_throughput']):>10}"
                  f"{_fmt(s['output_throughput']):>12}{_fmt(s['goodput']):>10}{_fmt(s['ttft']['p99_ms']):>10}"
                  f"{_fmt(s['tpot']['p99_ms']):>10}{_fmt(s['e2e']['p99_ms']):>10}{s['failed']:>8}\n")


def plot_runs(runs: list[tuple[dict[str, Any], list[RequestResult]]], plot_dir: Path) -> list[Path]:
    """latency_cdf.png for every run; sweep.png (throughput and p99 latency vs concurrency) for a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for summary, results in runs:
        ok = [r for r in results if r.ok]
        series = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
                  "TPOT": [t for r in ok if (t := r.tpot_s) is not None],
                  "ITL": [g for r in ok for g in r.itl_s], "e2e latency": [r.e2e_s for r in ok]}
        for ax, (name, values) in zip(axes.flat, series.items()):
            _cdf(ax, name, values, f"c={summary['concurrency'] or 'inf'}")
    fig.tight_layout()
    paths = [plot_dir / "latency_cdf.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if len(runs) > 1:
        paths.append(_plot_sweep([s for s, _ in runs], plot_dir / "sweep.png", plt))
    return paths


def _cdf(ax: Any, name: str, values_s: list[float], label: str) -> None:
    if values_s:
        xs = sorted(v * 1e3 for v in values_s)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.legend(fontsize="small")
    ax.set_title(f"{name} CDF")
    ax.set_xlabel("ms")
    ax.grid(True, alpha=0.3)


def _plot_sweep(summaries: list[dict[str, Any]], path: Path, plt: Any) -> Path:
    conc = [s["concurrency"] or 0 for s in summaries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(conc, [s["output_throughput"] for s in summaries], "o-", label="output tokens/s")
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("output tokens/s")
    twin = ax1.twinx()
    twin.plot(conc, [s["request_throughput"] for s in summaries], "s--", color="tab:orange", label="requests/s")
    twin.plot(conc, [s["goodput"] for s in summaries], "^:", color="tab:green", label="goodput (requests/s)")
    twin.set_ylabel("requests/s")
    twin.legend(loc="lower right")
    for metric in ("ttft", "tpot", "e2e"):
        ax2.plot(conc, [s[metric]["p99_ms"] for s in summaries], "o-", label=f"p99 {metric}")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("ms")
    ax2.set_yscale("log")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
