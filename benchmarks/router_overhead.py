"""Router overhead: the same streaming workload measured at three layers over one engine.

    engine  : AsyncEngine.generate called in-process (the baseline)
    grpc    : worker.server (gRPC servicer) <- router.worker_client.WorkerClient
    router  : router.app over HTTP (uvicorn, its own thread and loop) -> gRPC -> engine,
              driven by `k2serve bench`'s client

Overhead = the router / gRPC layer's TTFT, ITL and throughput minus the engine's. The engine is either
a paced fake that emits one token per `--step-ms` for every request (`--engine paced`, default: it
isolates the serving path from model compute) or the real Engine on the tiny K2-format checkpoint
(`--engine tiny`; on a busy CPU its step time varies more than the overhead being measured).
Every layer asks for exactly `--output-len` tokens (min_tokens = max_tokens). Not a test: run it by hand.

    python benchmarks/router_overhead.py [--engine paced|tiny] [--step-ms 5] [--num-requests 64] [--concurrency 8]
        [--input-len 64] [--output-len 32] [--model-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn

from cluster.bench import BenchConfig, LengthDist, RequestResult, make_requests, run_requests, summarize
from router.app import create_app
from router.chat_template import ChatTemplate
from router.config import RouterConfig
from router.tokenizer import K2Tokenizer
from router.worker_client import Finished, GenerateParams, WorkerClient
from worker.request import RequestOutput, SamplingParams
from worker.server import ModelInfo, serve_worker

MODEL = "kimi-k2-tiny"


class PacedEngine:
    """An AsyncEngine stand-in: one token per `step_s` for every running request, no model."""

    def __init__(self, step_s: float, token_id: int):
        self.step_s = step_s
        self.token_id = token_id

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        n = params.max_tokens or 16
        for i in range(n):
            await asyncio.sleep(self.step_s)
            last = i == n - 1
            yield RequestOutput(rid, [self.token_id], None, len(prompt), i + 1, 0, last, "length" if last else None)

    def abort(self, rid: str) -> bool:
        return True

    def get_load(self) -> Any:
        return None


def build_engine(kind: str, model_dir: Path, step_ms: float, tokenizer: K2Tokenizer) -> Any:
    if kind == "paced":
        return PacedEngine(step_ms / 1e3, tokenizer.encode(" the")[0])
    from worker.async_engine import AsyncEngine
    from worker.engine import Engine

    return AsyncEngine(Engine.from_model_dir(model_dir))


def workload(args: argparse.Namespace, base_url: str = "", layer: int = 0) -> BenchConfig:
    """The same request shapes for every layer; prompts differ per layer (`layer` shifts the seed) so
    that the engine's prefix cache cannot favour the layers measured later."""
    return BenchConfig(base_url=base_url, model=MODEL, endpoint="completions", num_requests=args.num_requests,
                       concurrency=args.concurrency, input_len=LengthDist(args.input_len, args.input_len),
                       output_len=LengthDist(args.output_len, args.output_len), force_min_tokens=True,
                       seed=args.seed + 1000 * layer)


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


async def run_engine_layer(engine: Any, cfg: BenchConfig, prompts: list[list[int]]) -> dict[str, Any]:
    async def one(i: int, ids: list[int], max_tokens: int) -> RequestResult:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
        return await timed_stream(engine.generate(f"e{i}", ids, params), lambda out: len(out.new_token_ids))

    return summarize(cfg, *await drive(cfg, prompts, one))


async def run_grpc_layer(address: str, cfg: BenchConfig, prompts: list[list[int]]) -> dict[str, Any]:
    client = WorkerClient(address)

    async def one(i: int, ids: list[int], max_tokens: int) -> RequestResult:
        params = GenerateParams(f"g{i}", tuple(ids), temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
        return await timed_stream(client.generate(params),
                                  lambda item: 0 if isinstance(item, Finished) else len(item.token_ids))

    return summarize(cfg, *await drive(cfg, prompts, one))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterThread:
    """The router app on uvicorn in its own thread and event loop (its gRPC channel lives there too)."""

    def __init__(self, grpc_address: str, model_dir: Path, tokenizer: K2Tokenizer):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = (grpc_address, model_dir, tokenizer)
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        grpc_address, model_dir, tokenizer = self._args
        app = create_app(RouterConfig(model_name=MODEL), [WorkerClient(grpc_address)], tokenizer,
                         ChatTemplate.from_dir(model_dir))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off"))
        await self._server.serve()

    async def __aenter__(self) -> "RouterThread":
        self._thread.start()
        deadline = time.monotonic() + 30
        while self._server is None or not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"router did not start on {self.url}")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        await asyncio.to_thread(self._thread.join, 10)


async def run_router_layer(args: argparse.Namespace, grpc_address: str, model_dir: Path,
                           tokenizer: K2Tokenizer) -> dict[str, Any]:
    """Drive the router over HTTP with `k2serve bench`'s client."""
    async with RouterThread(grpc_address, model_dir, tokenizer) as router:
        warm = workload(args, router.url, layer=5)
        await run_requests(dataclasses.replace(warm, num_requests=min(4, warm.num_requests)))
        cfg = workload(args, router.url, layer=2)
        results, duration = await run_requests(cfg)
        return summarize(cfg, results, duration)


def layer_prompts(args: argparse.Namespace, tokenizer: K2Tokenizer, layer: int) -> tuple[BenchConfig, list[list[int]]]:
    """The router sends /v1/completions prompts through the tokenizer unchanged: tokenize them the same way."""
    cfg = workload(args, layer=layer)
    return cfg, [tokenizer.encode(spec.prompt) for spec in make_requests(cfg)]


async def main_async(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    tokenizer = K2Tokenizer.from_dir(model_dir)
    engine = build_engine(args.engine, model_dir, args.step_ms, tokenizer)
    warm_cfg, warm = layer_prompts(args, tokenizer, layer=3)
    await run_engine_layer(engine, warm_cfg, warm[:4])
    layers = {"engine": await run_engine_layer(engine, *layer_prompts(args, tokenizer, layer=0))}
    server = await serve_worker(engine, "127.0.0.1", 0, ModelInfo.from_model_dir(model_dir, MODEL))
    address = f"127.0.0.1:{server.k2serve_port}"
    try:
        warm_cfg, warm = layer_prompts(args, tokenizer, layer=4)
        await run_grpc_layer(address, warm_cfg, warm[:4])
        layers["grpc"] = await run_grpc_layer(address, *layer_prompts(args, tokenizer, layer=1))
        layers["router"] = await run_router_layer(args, address, model_dir, tokenizer)
    finally:
        await server.stop(1.0)
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    return layers


def overhead_table(layers: dict[str, dict[str, Any]]) -> str:
    base = layers["engine"]
    lines = [f"{'layer':<8}{'ok':>5}{'fail':>6}{'tok/s':>10}{'ttft p50':>10}{'ttft p99':>10}{'itl mean':>10}"
             f"{'itl p99':>10}{'+ttft p50':>11}{'+itl mean':>11}"]
    for name, s in layers.items():
        d_ttft = (s["ttft"]["p50_ms"] or 0) - (base["ttft"]["p50_ms"] or 0)
        d_itl = (s["itl"]["mean_ms"] or 0) - (base["itl"]["mean_ms"] or 0)
        lines.append(f"{name:<8}{s['completed']:>5}{s['failed']:>6}{s['output_throughput']:>10.1f}"
                     f"{_ms(s['ttft']['p50_ms'])}{_ms(s['ttft']['p99_ms'])}{_ms(s['itl']['mean_ms'])}"
                     f"{_ms(s['itl']['p99_ms'])}{d_ttft:>11.3f}{d_itl:>11.3f}")
    return "\n".join(lines) + "\n(latencies in ms; + columns: difference from the engine layer)"


def _ms(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.3f}"


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
    p.add_argument("--json", help="write the three summaries as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "tiny-k2"
        if not args.model_dir:
            from cluster.tiny import make_tiny_model

            make_tiny_model(model_dir, seed=0)
        layers = asyncio.run(main_async(args, model_dir))
    print(overhead_table(layers))
    if args.json:
        Path(args.json).write_text(json.dumps(layers, indent=2))
    return 0 if all(s["failed"] == 0 for s in layers.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
