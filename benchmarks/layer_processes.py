"""The layers under test of benchmarks/router_overhead.py, each in its own Python process.

    python benchmarks/layer_processes.py --role worker --model-dir DIR [--engine paced|tiny] [--step-ms 5]
    python benchmarks/layer_processes.py --role router --model-dir DIR --worker HOST:PORT [--http h11] [--loop asyncio]

A role prints `READY <port> <pid>` once it serves and stops cleanly on SIGINT. `LayerProcess` starts one
(optionally under py-spy) and reads its CPU time from /proc. `PacedEngine` is the engine stand-in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.worker.health import SERVING, EngineHealth
from k2serve.worker.request import RequestOutput, SamplingParams

MODEL = "kimi-k2-tiny"
READY = "READY"


class PacedEngine:  # a worker.server.ServedEngine
    """An AsyncEngine stand-in that steps like the real engine: every `step_s` one step gives each running
    request its next token, all of them in the same event-loop pass (the engine thread hands a step's
    outputs over together); a consumer that falls behind gets the tokens it missed merged into one
    output, as AsyncEngine merges queued outputs.

    A request's first token (its prefill) comes exactly `step_s` after it arrived, whatever the phase of
    the running steps: a real engine's TTFT depends on where in a step a request lands, and that phase
    would move TTFT by up to a step between layers for reasons that are not theirs. Steps run on
    absolute deadlines, so a late wake-up does not delay the steps after it: the engine's pace is the
    same in every layer, and whatever a layer adds shows up as its own latency.
    """

    def __init__(self, step_s: float, token_id: int):
        self.step_s = step_s
        self.token_id = token_id
        self._steps = 0
        self._stepped = asyncio.Event()
        self._running = 0
        self._ticker: asyncio.Task | None = None

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams,
                       output_ids=()) -> AsyncIterator[RequestOutput]:
        n = params.max_tokens or 16
        arrived = time.monotonic()
        self._join()
        try:
            await asyncio.sleep(max(0.0, arrived + self.step_s - time.monotonic()))  # the prefill step
            seen, done = self._steps, 1
            yield RequestOutput(rid, [self.token_id], None, len(prompt), 1, 0, n == 1, "length" if n == 1 else None)
            while done < n:
                while self._steps == seen:
                    await self._stepped.wait()
                new = min(n - done, self._steps - seen)
                seen, done = self._steps, done + new
                last = done == n
                yield RequestOutput(rid, [self.token_id] * new, None, len(prompt), done, 0, last,
                                    "length" if last else None)
        finally:
            self._running -= 1

    def _join(self) -> None:
        self._running += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        """Step while any request runs; stop when idle (the next request starts a new ticker). After a
        late wake-up the missed steps count at once (their tokens come merged)."""
        start, steps = time.monotonic(), 0
        while self._running:
            await asyncio.sleep(max(0.0, start + (steps + 1) * self.step_s - time.monotonic()))
            due = max(steps + 1, int((time.monotonic() - start) / self.step_s))
            self._steps += due - steps
            steps = due
            stepped, self._stepped = self._stepped, asyncio.Event()
            stepped.set()

    def abort(self, rid: str) -> bool:
        return True

    def get_load(self) -> Any:
        from k2serve.worker.engine import EngineLoad  # here: the router process must not import torch

        return EngineLoad(self._running, 0, 0.0, 0.0, 0)

    def health(self) -> EngineHealth:
        return EngineHealth(SERVING)

    async def drain(self, grace_s: float) -> int:
        deadline = time.monotonic() + grace_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(self.step_s)
        return self._running


def build_engine(kind: str, model_dir: Path, step_ms: float) -> Any:
    """The paced fake (token id of " the") or the real AsyncEngine on `model_dir`."""
    if kind == "paced":
        return PacedEngine(step_ms / 1e3, K2Tokenizer.from_dir(model_dir).encode(" the")[0])
    from k2serve.worker.async_engine import AsyncEngine
    from k2serve.worker.engine import Engine

    return AsyncEngine(Engine.from_model_dir(model_dir))


# ---------------------------------------------------------------- the layer processes


async def worker_role(args: argparse.Namespace) -> None:
    """The worker process: the real gRPC server over the engine until SIGINT/SIGTERM."""
    from k2serve.worker.server import ModelInfo, serve_worker, stop_worker

    model_dir = Path(args.model_dir)
    engine = build_engine(args.engine, model_dir, args.step_ms)
    server = await serve_worker(engine, "127.0.0.1", 0, ModelInfo.from_model_dir(model_dir, MODEL))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(READY, server.k2serve_port, os.getpid(), flush=True)
    await stop.wait()
    await stop_worker(server, 1.0)
    if hasattr(engine, "shutdown"):
        engine.shutdown()


async def router_role(args: argparse.Namespace) -> None:
    """The router process, wired as `k2serve router` wires it (cluster.router_service), over one group."""
    import uvicorn

    from k2serve.cluster.config import ClusterConfig
    from k2serve.cluster.router_service import build_router_app
    from k2serve.router.pool.discovery import StaticDiscovery

    config = ClusterConfig(model={"name": MODEL})
    app = build_router_app(config, args.model_dir, StaticDiscovery([("group-0", args.worker)]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           http=args.http, access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(READY, port, os.getpid(), flush=True)
    await task
    await app.state.pool.close()


def run_role(args: argparse.Namespace) -> int:
    """Run one layer (`args.role`: worker | router) until SIGINT."""
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    try:
        run(worker_role(args) if args.role == "worker" else router_role(args))
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained on
        pass
    return 0


def py_spy() -> str:
    """The py-spy beside this interpreter (a virtual environment's bin/) or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process from /proc (None where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LayerProcess:
    """One layer (`--role worker|router`) in its own Python process; it prints `READY <port> <pid>`.

    `profile` (a file name) runs it under `py-spy record` (raw collapsed stacks, written at exit);
    `cpus` pins it to those CPUs; `script` and `env` run another checkout's layer_processes.py.
    """

    def __init__(self, role: str, role_args: list[str], profile: str | None = None, cpus: set[int] | None = None,
                 script: Path | None = None, env: dict[str, str] | None = None):
        self.role = role
        role_args = role_args + (["--cpus", ",".join(map(str, sorted(cpus)))] if cpus else [])
        # --gil: samples only where Python holds the GIL (CPU, not waits); --nonblocking: no pauses
        spy = [py_spy(), "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking", "-o", str(profile),
               "--"]
        prefix = spy if profile else []
        script = script or Path(__file__).resolve()  # another checkout's copy runs that checkout's layer
        self.argv = prefix + [sys.executable, str(script), "--role", role, *role_args]
        self.env = env
        self.port = self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "LayerProcess":
        self._proc = await asyncio.create_subprocess_exec(*self.argv, stdout=asyncio.subprocess.PIPE, env=self.env)
        try:
            line = await asyncio.wait_for(self._ready_line(), 180)
        except asyncio.TimeoutError:
            line = []
        if len(line) != 3 or line[0] != READY:
            await self._stop()
            raise RuntimeError(f"the {self.role} process did not start (said {line!r}, exit code "
                               f"{self._proc.returncode}); its stderr is above")
        self.port, self.pid = int(line[1]), int(line[2])
        return self

    async def _ready_line(self) -> list[str]:
        """The READY line's words; other output (py-spy's banner) is passed on to stderr."""
        while raw := await self._proc.stdout.readline():
            words = raw.decode(errors="replace").split()
            if words[:1] == [READY]:
                return words
            print(raw.decode(errors="replace").rstrip(), file=sys.stderr)
        return []

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid) or 0.0

    async def __aexit__(self, *exc: Any) -> None:
        await self._stop()

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.kill(self.pid or proc.pid, signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        except ProcessLookupError:
            await proc.wait()
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def parse_role_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["worker", "router"], required=True)
    p.add_argument("--model-dir", required=True, help="K2-format checkpoint (tokenizer, template, config)")
    p.add_argument("--engine", choices=["tiny", "paced"], default="paced")
    p.add_argument("--step-ms", type=float, default=5.0, help="paced engine: ms per token")
    p.add_argument("--worker", help="router: the worker's gRPC address")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto", help="router: uvicorn's HTTP parser")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the process's event loop")
    p.add_argument("--cpus", help="pin the process to these CPUs (comma-separated)")
    args = p.parse_args(argv)
    if args.role == "router" and not args.worker:
        p.error("--role router needs --worker HOST:PORT")
    return args


if __name__ == "__main__":
    raise SystemExit(run_role(parse_role_args()))
