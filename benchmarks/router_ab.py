"""Router CPU per streamed token: this checkout's router against another checkout's, side by side in one run.

    git worktree add --detach /tmp/k2serve-base main   # the "before"
    python benchmarks/router_ab.py --baseline /tmp/k2serve-base [--concurrency 32] [--num-requests 128]
        [--repeats 7] [--output-len 32] [--json FILE]
    git worktree remove /tmp/k2serve-base

One worker process (this checkout's, the paced engine of benchmarks/layer_processes.py) serves two router
processes: the baseline's (its own benchmarks/layer_processes.py --role router, importing its own code
through a `k2serve` shim package on PYTHONPATH built from its pyproject's package-dir) and this
checkout's. The same streaming load (`k2serve bench`'s client, /v1/completions, min_tokens = max_tokens)
goes to one router, then the other, alternating which goes first (AB BA AB ...), so that a busy moment of
the machine falls on both. Each run's router CPU (from /proc) is divided by its output tokens. Prints every
run, the medians and their ratio (this / baseline) and the median of the repeats' ratios. Not a test: run
it by hand, on a quiet machine if you can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from layer_processes import LayerProcess
from router_overhead import Meter, measure_router, workload
from k2serve.cluster.bench import run_requests

REPO = Path(__file__).resolve().parent.parent


def build_shim(checkout: Path, into: Path) -> Path:
    """A folder holding a `k2serve` package whose parts are `checkout`'s folders (as its pyproject maps them)."""
    mapping = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = into / "k2serve"
    root.mkdir(parents=True)
    top = checkout / mapping["k2serve"]
    for entry in top.iterdir():  # __init__.py, v1/, ...
        (root / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "k2serve":
            (root / name.split(".", 1)[1]).symlink_to(checkout / folder)
    return into


async def warm_up(url: str, args: argparse.Namespace) -> None:
    await run_requests(workload(args, url, layer=5, num_requests=min(8, args.num_requests)))


async def one_run(name: str, url: str, meter: Meter, args: argparse.Namespace, repeat: int) -> dict[str, Any]:
    summary, cpu, _ = await measure_router(args, url, meter, repeat=repeat, layer=2)
    tokens = max(summary["total_output_tokens"], 1)
    return {"router": name, "repeat": repeat, "failed": summary["failed"], "tokens": tokens,
            "router_us_per_token": cpu["router"] / tokens * 1e6,
            "worker_us_per_token": cpu["worker"] / tokens * 1e6, "tok_per_s": summary["output_throughput"]}


async def main_async(args: argparse.Namespace, model_dir: Path, shim: Path) -> list[dict[str, Any]]:
    common = ["--engine", "paced", "--step-ms", str(args.step_ms), "--model-dir", str(model_dir)]
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    async with LayerProcess("worker", common) as worker:
        router_args = common + ["--worker", f"127.0.0.1:{worker.port}"]
        base_script = args.baseline / "benchmarks" / "layer_processes.py"
        async with LayerProcess("router", router_args, script=base_script, env=env) as base, \
                LayerProcess("router", router_args) as this:
            routers = {"baseline": base, "this": this}
            urls = {name: f"http://127.0.0.1:{p.port}" for name, p in routers.items()}
            for url in urls.values():
                await warm_up(url, args)
            runs = []
            for r in range(args.repeats):
                order = ("baseline", "this") if r % 2 == 0 else ("this", "baseline")
                for name in order:
                    meter = Meter({"worker": worker, "router": routers[name]})
                    runs.append(await one_run(name, urls[name], meter, args, r))
                    print(_row(runs[-1]), file=sys.stderr, flush=True)
            return runs


def _row(run: dict[str, Any]) -> str:
    return (f"{run['router']:<9}{run['repeat']:>4}{run['router_us_per_token']:>10.1f}"
            f"{run['worker_us_per_token']:>10.1f}{run['tok_per_s']:>10.0f}{run['failed']:>6}")


def report(runs: list[dict[str, Any]]) -> str:
    med = {name: statistics.median(r["router_us_per_token"] for r in runs if r["router"] == name)
           for name in ("baseline", "this")}
    lines = [f"{'router':<9}{'run':>4}{'router':>10}{'worker':>10}{'tok/s':>10}{'fail':>6}   (CPU us per output token)"]
    lines += [_row(r) for r in runs]
    pairs = {}
    for r in runs:
        pairs.setdefault(r["repeat"], {})[r["router"]] = r["router_us_per_token"]
    paired = statistics.median(p["this"] / p["baseline"] for p in pairs.values() if len(p) == 2)
    lines.append(f"median router CPU per output token: baseline {med['baseline']:.1f} us, this {med['this']:.1f} us, "
                 f"ratio {med['this'] / med['baseline']:.3f}; median of the per-repeat ratios {paired:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of k2serve (e.g. a worktree of main)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=64, help="prompt words")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=5.0, help="paced engine: ms per token")
    p.add_argument("--repeats", type=int, default=7, help="runs per router, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every run as JSON")
    args = p.parse_args(argv)
    if not (args.baseline / "pyproject.toml").exists():
        p.error(f"{args.baseline} is not a k2serve checkout (no pyproject.toml)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        from k2serve.cluster.tiny import make_tiny_model

        model_dir = Path(tmp) / "tiny-k2"
        make_tiny_model(model_dir, seed=0)
        runs = asyncio.run(main_async(args, model_dir, build_shim(args.baseline.resolve(), Path(tmp) / "shim")))
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
