"""Router overhead: the same streaming workload against the engine directly and through gRPC and the router.

Each layer runs in its own process (benchmarks/layer_processes.py), as in production, so that one
layer's CPU does not slow another through a shared GIL:

    engine : the engine's `generate` called in the load generator's process (the baseline)
    grpc   : a worker process (the real gRPC server over the same engine) <- router.worker_client.WorkerClient
    router : a router process (uvicorn + the production app: GroupPool, balancer, admission, metrics)
             -> the same worker process; driven over HTTP by `k2serve bench`'s client

The engine is a paced fake that emits one token per `--step-ms` for every request on fixed deadlines
(`--engine paced`, default: it isolates the serving path from model compute) or the real Engine on the
tiny K2-format checkpoint (`--engine tiny`). Every layer asks for exactly `--output-len` tokens
(min_tokens = max_tokens). The processes' CPU time is read from /proc: it gives the router's cost per
request and per token, which depends much less than latency on what else the machine runs (it does
depend on concurrency: with few streams every token wakes the processes on its own). A second router
run of 1-token requests separates the per-request from the per-token cost. Not a test: run it by hand.

    python benchmarks/router_overhead.py [--engine paced|tiny] [--step-ms 5] [--num-requests 64]
        [--concurrency 8] [--input-len 64] [--output-len 32] [--model-dir DIR] [--http auto|h11|httptools]
        [--loop asyncio|uvloop] [--pin] [--profile-router FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import process_hops
from layer_processes import MODEL, LayerProcess, build_engine
from overhead_report import machine, render, router_cost, verdict
from k2serve.cluster.bench import BenchConfig, LengthDist, RequestResult, make_requests, run_requests, summarize
from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.router.pool.worker import Finished, GenerateParams
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.worker.request import SamplingParams



# ---------------------------------------------------------------- load


def workload(args: argparse.Namespace, base_url: str = "", layer: int = 0, num_requests: int | None = None,
             output_len: int | None = None, repeat: int = 0) -> BenchConfig:
    """The same request shapes for every layer; prompts differ per layer and repeat (they shift the seed)
    so that the engine's prefix cache cannot favour the runs measured later."""
    out = output_len or args.output_len
    return BenchConfig(base_url=base_url, model=MODEL, endpoint="completions",
                       num_requests=num_requests or args.num_requests, concurrency=args.concurrency,
                       input_len=LengthDist(args.input_len, args.input_len), output_len=LengthDist(out, out),
                       force_min_tokens=True, seed=args.seed + 1000 * layer + 100 * repeat)


async def timed_stream(stream: AsyncIterator[Any], count_tokens) -> RequestResult:
    """Measure one in-process stream with the same definitions as `k2serve bench`."""
    res, start = RequestResult(), time.perf_counter()
    last = start
    try:
        async for item in stream:
            n = count_tokens(item)
            if not n:
                continue
            now = time.perf_counter()
            if res.ttft_s is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last = now
            res.output_chunks += 1
            res.output_tokens += n
        res.ok = res.ttft_s is not None
        res.error_kind = None if res.ok else "empty_output"
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not raised
        res.error_kind, res.error = type(exc).__name__, str(exc)[:200]
    res.e2e_s = time.perf_counter() - start
    return res


async def drive(cfg: BenchConfig, prompts: list[list[int]], one) -> tuple[list[RequestResult], float]:
    """Run `one(i, prompt_ids, max_tokens)` for every request with at most cfg.concurrency in flight."""
    limit = asyncio.Semaphore(cfg.concurrency or len(prompts))
    specs = make_requests(cfg)

    async def bounded(i: int) -> RequestResult:
        async with limit:
            return await one(i, prompts[i], specs[i].max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(len(prompts))))
    return list(results), time.perf_counter() - start


def layer_prompts(cfg: BenchConfig, tokenizer: K2Tokenizer) -> list[list[int]]:
    """The router sends /v1/completions prompts through the tokenizer unchanged: tokenize them the same way."""
    return [tokenizer.encode(spec.prompt) for spec in make_requests(cfg)]


async def engine_rows(engine: Any, cfg: BenchConfig, prompts: list[list[int]]) -> tuple[list[RequestResult], float]:
    async def one(i: int, ids: list[int], max_tokens: int) -> RequestResult:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
        return await timed_stream(engine.generate(f"e{cfg.seed}-{i}", ids, params), lambda out: len(out.new_token_ids))

    return await drive(cfg, prompts, one)


async def grpc_rows(client: WorkerClient, cfg: BenchConfig,
                    prompts: list[list[int]]) -> tuple[list[RequestResult], float]:
    async def one(i: int, ids: list[int], max_tokens: int) -> RequestResult:
        params = GenerateParams(f"g{cfg.seed}-{i}", tuple(ids), temperature=0.0, max_tokens=max_tokens,
                                min_tokens=max_tokens)
        return await timed_stream(client.generate(params),
                                  lambda item: 0 if isinstance(item, Finished) else len(item.token_ids))

    return await drive(cfg, prompts, one)


@dataclass
class Meter:
    """CPU seconds of the load generator and the layer processes over one measured run."""

    processes: dict[str, LayerProcess]

    def snapshot(self) -> dict[str, float]:
        cpu = {name: p.cpu_s() for name, p in self.processes.items()}
        cpu["loadgen"] = time.process_time()
        return cpu

    async def measure(self, run) -> tuple[dict[str, Any], dict[str, float]]:
        """Run `run()` -> (cfg, results, duration); returns its summary and the CPU seconds each process spent."""
        before = self.snapshot()
        cfg, results, duration = await run()
        after = self.snapshot()
        return summarize(cfg, results, duration), {k: after[k] - before[k] for k in after}


async def warm_up(args, engine, client: WorkerClient, url: str, tokenizer) -> None:
    """A few requests through every layer first (connections, caches, lazy imports)."""
    warm = [workload(args, url, layer=layer, num_requests=min(4, args.num_requests)) for layer in (3, 4, 5)]
    await engine_rows(engine, warm[0], layer_prompts(warm[0], tokenizer))
    await grpc_rows(client, warm[1], layer_prompts(warm[1], tokenizer))
    await run_requests(warm[2])


async def measure_engine(args, engine, tokenizer, meter: Meter, repeat: int = 0) -> tuple[dict, dict]:
    cfg = workload(args, layer=0, repeat=repeat)
    prompts = layer_prompts(cfg, tokenizer)
    return await meter.measure(lambda: _with_cfg(cfg, engine_rows(engine, cfg, prompts)))


async def measure_grpc(args, client: WorkerClient, tokenizer, meter: Meter, repeat: int = 0) -> tuple[dict, dict]:
    cfg = workload(args, layer=1, repeat=repeat)
    prompts = layer_prompts(cfg, tokenizer)
    return await meter.measure(lambda: _with_cfg(cfg, grpc_rows(client, cfg, prompts)))


async def measure_router(args, url: str, meter: Meter, repeat: int = 0, layer: int = 2,
                         output_len: int | None = None) -> tuple[dict, dict, dict]:
    """The router layer's summary, CPU seconds, and latencies as the router itself measured them."""
    cfg = workload(args, url, layer=layer, output_len=output_len, repeat=repeat)
    before = await router_series(url)
    summary, cpu = await meter.measure(lambda: _with_cfg(cfg, run_requests(cfg)))
    return summary, cpu, series_means(before, await router_series(url))


ROUTER_SERIES = {"queue": "k2serve_router_queue_time_seconds",
                 "ttft": "k2serve_router_time_to_first_token_seconds",
                 "request": "k2serve_router_request_duration_seconds"}


async def router_series(url: str) -> dict[str, list[float]]:
    """[sum, count] of the router's own latency histograms, read from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(url + "/metrics")).text
    totals = {key: [0.0, 0.0] for key in ROUTER_SERIES}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, name in ROUTER_SERIES.items():
                if sample.name in (name + "_sum", name + "_count"):
                    totals[key][sample.name.endswith("_count")] += sample.value
    return totals


def series_means(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float | None]:
    """Mean milliseconds of each series over the requests between the two readings."""
    means = {}
    for key in ROUTER_SERIES:
        total, count = (after[key][i] - before[key][i] for i in (0, 1))
        means[f"{key}_mean_ms"] = total / count * 1e3 if count else None
    return means


async def _with_cfg(cfg: BenchConfig, rows) -> tuple[BenchConfig, list[RequestResult], float]:
    results, duration = await rows
    return cfg, results, duration


async def main_async(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Measure the three layers `--repeats` times, interleaved (engine, grpc, router, engine, ...), then the
    router's per-request cost; returns the per-layer medians, the runs, and CPU seconds per run."""
    cpus = pinning(args.pin)
    if cpus:
        os.sched_setaffinity(0, cpus["loadgen"])
    tokenizer = K2Tokenizer.from_dir(model_dir)
    engine = build_engine(args.engine, model_dir, args.step_ms)
    common = ["--engine", args.engine, "--step-ms", str(args.step_ms), "--model-dir", str(model_dir)]
    report: dict[str, Any] = {"machine": machine(), "pinned": {k: sorted(v) for k, v in cpus.items()},
                              "hops": await process_hops.measure(args.step_ms / 1e3)}
    try:
        async with LayerProcess("worker", common, cpus=cpus.get("worker")) as worker:
            address = f"127.0.0.1:{worker.port}"
            router_args = common + ["--worker", address, "--http", args.http, "--loop", args.loop]
            async with LayerProcess("router", router_args, args.profile_router, cpus.get("router")) as router:
                client, url = WorkerClient(address), f"http://127.0.0.1:{router.port}"
                try:
                    report.update(await measure_all(args, engine, client, url, tokenizer, worker, router))
                finally:
                    await client.close()
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    return report


async def measure_all(args, engine, client: WorkerClient, url: str, tokenizer, worker: LayerProcess,
                      router: LayerProcess) -> dict[str, Any]:
    await warm_up(args, engine, client, url, tokenizer)
    meters = {"engine": Meter({}), "grpc": Meter({"worker": worker}),
              "router": Meter({"worker": worker, "router": router})}
    runs: dict[str, list] = {"engine": [], "grpc": [], "router": []}
    views = []
    for r in range(args.repeats):
        runs["engine"].append(await measure_engine(args, engine, tokenizer, meters["engine"], r))
        runs["grpc"].append(await measure_grpc(args, client, tokenizer, meters["grpc"], r))
        summary, cpu, view = await measure_router(args, url, meters["router"], r)
        runs["router"].append((summary, cpu))
        views.append(view)
    _, cpu_1tok, _ = await measure_router(args, url, meters["router"], layer=6, output_len=1)
    return {"layers": {name: median_summary([s for s, _ in rs]) for name, rs in runs.items()},
            "cpu_s": {**{name: mean_cpu([c for _, c in rs]) for name, rs in runs.items()}, "router_1tok": cpu_1tok},
            "router_view": {k: _median([v[k] for v in views]) for k in views[0]},
            "runs": {name: [s for s, _ in rs] for name, rs in runs.items()}}


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for a layer's runs: medians of the rates and latency statistics, failures summed."""
    out = dict(summaries[0])
    for key in ("request_throughput", "output_throughput", "total_output_tokens"):
        out[key] = _median([s[key] for s in summaries])
    for key in ("ttft", "itl", "e2e", "tpot"):
        out[key] = {stat: _median([s[key][stat] for s in summaries]) for stat in summaries[0][key]}
    out["completed"] = sum(s["completed"] for s in summaries)
    out["failed"] = sum(s["failed"] for s in summaries)
    return out


def mean_cpu(cpus: list[dict[str, float]]) -> dict[str, float]:
    """CPU seconds per run (the runs of a layer have the same requests and tokens)."""
    return {k: sum(c[k] for c in cpus) / len(cpus) for k in cpus[0]}


def _median(values: list) -> Any:
    present = sorted(v for v in values if v is not None)
    return statistics.median(present) if present else None


def pinning(pin: bool) -> dict[str, set[int]]:
    """`--pin`: two CPUs of its own for each process (the load generator, the worker, the router)."""
    if not pin:
        return {}
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 6:
        raise SystemExit(f"--pin needs 6 CPUs, this process may use {len(available)}")
    return {name: set(available[2 * i:2 * i + 2]) for i, name in enumerate(("loadgen", "worker", "router"))}


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["tiny", "paced"], default="paced")
    p.add_argument("--step-ms", type=float, default=5.0, help="paced engine: ms per token")
    p.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh tiny one in a temp dir)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64, help="prompt words")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each layer this many times, interleaved; the tables show medians")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="uvicorn's HTTP parser in the router process (auto: httptools when installed)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="event loop of the router process (k2serve's router runs asyncio's)")
    p.add_argument("--pin", action="store_true",
                   help="give the load generator, the worker and the router two CPUs each (needs 6)")
    p.add_argument("--profile-router", metavar="FILE", help="run the router under py-spy; collapsed stacks to FILE")
    p.add_argument("--json", help="write the summaries and CPU seconds as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_requests < 1 or args.concurrency < 1:
        p.error("--repeats, --num-requests and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "tiny-k2"
        if not args.model_dir:
            from k2serve.cluster.tiny import make_tiny_model

            make_tiny_model(model_dir, seed=0)
        report = asyncio.run(main_async(args, model_dir))
    print(render(report, args))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, **verdict(report["layers"]),
                                               "router_cost": router_cost(report, args)}, indent=2))
    return 0 if all(s["failed"] == 0 for s in report["layers"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
