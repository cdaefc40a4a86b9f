"""benchmarks/router_overhead.py's report: the tables it prints and the issue's two numbers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import process_hops



def machine() -> dict[str, Any]:
    """CPUs and load when the run began: latencies on a busy machine measure the machine as much as the code."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpus": os.cpu_count(), "load_avg_1m": load[0], "python": sys.version.split()[0]}


def overhead_table(layers: dict[str, dict[str, Any]]) -> str:
    """One row per layer: throughput and latency percentiles (ms)."""
    head = (f"{'layer':<8}{'ok':>5}{'fail':>5}{'req/s':>9}{'tok/s':>9}{'ttft p50':>10}{'ttft p99':>10}"
            f"{'itl p50':>9}{'e2e p50':>9}")
    lines = [head]
    for name, s in layers.items():
        lines.append(f"{name:<8}{s['completed']:>5}{s['failed']:>5}{s['request_throughput']:>9.2f}"
                     f"{s['output_throughput']:>9.1f}{_ms(s['ttft']['p50_ms'], 10)}{_ms(s['ttft']['p99_ms'], 10)}"
                     f"{_ms(s['itl']['p50_ms'], 9)}{_ms(s['e2e']['p50_ms'], 9)}")
    return "\n".join(lines) + "\n(latencies in ms)"


def cpu_table(report: dict[str, Any]) -> str:
    """CPU microseconds per output token spent by each process while a layer was measured, their sum, and
    the token rate that sum allows on this machine's CPUs (the ceiling when the machine runs nothing else)."""
    lines = [f"{'layer':<8}{'loadgen':>10}{'worker':>10}{'router':>10}{'all':>10}{'cpu-bound tok/s':>17}"
             "   (CPU us per output token)"]
    cpus = report["machine"]["cpus"] or 1
    for name, cpu in report["cpu_s"].items():
        if name not in report["layers"]:
            continue
        tokens = max(report["layers"][name]["total_output_tokens"], 1)
        cells = "".join(f"{_us(cpu.get(p), tokens):>10}" for p in ("loadgen", "worker", "router"))
        total = sum(cpu.values())
        ceiling = f"{cpus * tokens / total:.0f}" if total > 0 else "-"
        lines.append(f"{name:<8}{cells}{_us(total, tokens):>10}{ceiling:>17}")
    return "\n".join(lines)


def router_cost(report: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Router CPU per request and per token from two runs: 1-token requests and the main workload."""
    n = args.num_requests
    per_request = report["cpu_s"]["router_1tok"]["router"] / n
    tokens = max(report["layers"]["router"]["total_output_tokens"], 1)
    per_token = max(report["cpu_s"]["router"]["router"] - per_request * n, 0.0) / tokens
    return {"per_request_ms": per_request * 1e3, "per_token_us": per_token * 1e6}


def verdict(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The issue's two numbers: router/engine output throughput and router - engine p50 TTFT (ms)."""
    base, routed = layers["engine"], layers["router"]
    ratio = routed["output_throughput"] / base["output_throughput"] if base["output_throughput"] else 0.0
    added = (routed["ttft"]["p50_ms"] or 0.0) - (base["ttft"]["p50_ms"] or 0.0)
    return {"throughput_ratio": ratio, "ttft_p50_added_ms": added}


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    cost, result = router_cost(report, args), verdict(report["layers"])
    view, client = report["router_view"], report["layers"]["router"]
    m = report["machine"]
    return "\n".join([
        f"machine: {m['cpus']} CPUs, load average {m['load_avg_1m']:.2f} at the start; engine {args.engine}, "
        f"concurrency {args.concurrency}, {args.num_requests} requests x {args.output_len} tokens, router http "
        f"{args.http}, loop {args.loop}; medians of {args.repeats} interleaved run(s) per layer"
        + (f"; pinned {report['pinned']}" if report["pinned"] else ""),
        overhead_table(report["layers"]), "", cpu_table(report), "",
        process_hops.describe(report["hops"]) + "; the router layer makes 4 hops that the engine layer does not",
        f"router's own view (its /metrics, means): queued {_ms(view['queue_mean_ms'], 0)} ms, dispatch to first "
        f"token {_ms(view['ttft_mean_ms'], 0)} ms, request {_ms(view['request_mean_ms'], 0)} ms; "
        f"the client saw TTFT {_ms(client['ttft']['mean_ms'], 0)} ms, e2e {_ms(client['e2e']['mean_ms'], 0)} ms",
        f"router CPU: {cost['per_request_ms']:.2f} ms per request + {cost['per_token_us']:.0f} us per output token",
        f"throughput_ratio: {result['throughput_ratio']:.3f}",
        f"ttft_p50_added_ms: {result['ttft_p50_added_ms']:.2f}",
    ])


def _ms(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}"


def _us(seconds: float | None, tokens: int) -> str:
    return "-" if seconds is None else f"{seconds / tokens * 1e6:.0f}"
