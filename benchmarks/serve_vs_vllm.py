"""The whole serving path side by side: `k2serve serve` (router + gRPC + engine) vs `vllm serve`, same box.

    python benchmarks/serve_vs_vllm.py [--concurrency 1,16,64] [--repeats 2] [--dtype float32]

Same model, checkpoints and vLLM venv as engine_vs_vllm.py (prepared the same way). Both servers are
driven by `k2serve bench`'s load generator (cluster/bench.py) on /v1/completions with the same token-id
prompts and output lengths as engine_vs_vllm.py's workload (streaming, greedy, ignore_eos): vLLM cannot
load the K2-format tokenizer, so it runs with --skip-tokenizer-init and streams token ids
(`return_token_ids`); k2serve's router takes the token-id prompts as they are. k2serve runs one worker
group of one rank (tp = ep = 1, one Ray CPU slot, so one torch thread), vLLM its defaults. Rounds
alternate between the servers; the table shows best (median) output tok/s and TTFT p50, and ends with
`k2serve/vllm serving tok/s: c=1 X, c=16 Y, c=64 Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from engine_vs_hf import make_workload
from engine_vs_vllm import VLLM_ENV, Progress, prepare_checkpoints
from k2serve.cluster.bench import BenchConfig, run_bench
from vllm_setup import DEFAULT_VENV, ensure_vllm_venv

READY_TIMEOUT_S = 1800.0
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess with its log, ready once GET /v1/models answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str], say: Progress):
        self.name, self.url, self.log_path, self.say = name, f"http://127.0.0.1:{port}", log_path, say
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            self.model = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> str:
        start = last = time.monotonic()
        while time.monotonic() - start < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                    return json.loads(resp.read())["data"][0]["id"]
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(2)
            if time.monotonic() - last > 30:
                last = time.monotonic()
                self.say(f"  {self.name} still starting ({last - start:.0f} s); log: {self.log_path}")
        raise TimeoutError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGINT (k2serve serve stops cleanly on Ctrl-C; vLLM's server too), then kill after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def k2serve_config(model_dir: Path, dtype: str, port: int, max_seqs: int) -> str:
    return json.dumps({  # JSON is YAML
        "model": {"path": str(model_dir), "name": "k2-tiny-mla"},
        "groups": [{"name": "g0", "tp": 1, "ep": 1}],
        "engine": {"max_num_seqs": max_seqs, "max_model_len": 1024, "max_num_batched_tokens": 4096, "dtype": dtype},
        "router": {"port": port, "max_concurrency": 256},
        "controller": {"discovery_port": free_port()},
        "ray": {"num_cpus": 2},
    })


def start_k2serve(args, k2_dir: Path, work: Path, say: Progress) -> Server:
    port = free_port()
    config = work / "k2serve.yaml"
    config.write_text(k2serve_config(k2_dir, args.dtype, port, max(levels(args))))
    cmd = [str(Path(sys.executable).with_name("k2serve")), "serve", "--config", str(config)]
    say(f"starting k2serve serve on port {port}")
    return Server("k2serve serve", cmd, port, work / "k2serve-serve.log", LOCAL_RAY_ENV, say)


def start_vllm(args, plain_dir: Path, work: Path, say: Progress) -> Server:
    python, port = ensure_vllm_venv(args.venv, say), free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain_dir), "--dtype", args.dtype,
           "--skip-tokenizer-init", "--max-model-len", "1024", "--max-num-seqs", str(max(levels(args))),
           "--host", "127.0.0.1", "--port", str(port)]
    say(f"starting vllm serve on port {port} (minutes: it compiles the model)")
    return Server("vllm serve", cmd, port, work / "vllm-serve.log", VLLM_ENV, say)


def bench_once(server: Server, rows: tuple[dict, ...], c: int) -> dict:
    cfg = BenchConfig(base_url=server.url, model=server.model, endpoint="completions", num_requests=len(rows),
                      concurrency=c, prompts=rows, ignore_eos=True, temperature=0.0,
                      return_token_ids=server.name.startswith("vllm"))
    summary, _ = run_bench(cfg)
    if summary["failed"]:
        raise RuntimeError(f"{server.name}: {summary['failed']} requests failed: {summary['errors_by_kind']}")
    return summary


def measure(servers: list[Server], rows, c: int, repeats: int, say: Progress) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s.name: [] for s in servers}
    for r in range(repeats):
        for server in servers[r % len(servers):] + servers[: r % len(servers)]:
            summary = bench_once(server, rows, c)
            say(f"  round {r + 1}/{repeats}: {server.name} {summary['output_throughput']:8.1f} tok/s, "
                f"TTFT p50 {summary['ttft']['p50_ms']:.0f} ms")
            runs[server.name].append(summary)
    return runs


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def print_table(all_runs: dict[int, dict[str, list[dict]]]) -> dict[int, float]:
    print("| C | k2serve serve tok/s | vllm serve tok/s | k2serve / vLLM | TTFT p50 ms k2serve / vLLM |")
    print("|---|---|---|---|---|")
    ratios = {}
    for c, runs in all_runs.items():
        tps = {n: [s["output_throughput"] for s in rs] for n, rs in runs.items()}
        ttft = {n: median([s["ttft"]["p50_ms"] for s in rs]) for n, rs in runs.items()}
        ours, theirs = tps["k2serve serve"], tps["vllm serve"]
        ratios[c] = max(ours) / max(theirs)
        print(f"| {c} | {max(ours):,.1f} ({median(ours):,.1f}) | {max(theirs):,.1f} ({median(theirs):,.1f}) | "
              f"{ratios[c]:.2f}x | {ttft['k2serve serve']:.0f} / {ttft['vllm serve']:.0f} |")
    return ratios


def levels(args) -> list[int]:
    return [int(c) for c in args.concurrency.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh mla-k2-widths tiny one)")
    p.add_argument("--work-dir", help="checkpoints, configs and server logs (default: a new temporary directory)")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="both servers' dtype (float32: the faster on an AVX2 CPU)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    import tempfile

    args, say = parse_args(), Progress()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="k2serve-serve-vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    k2_dir, plain_dir = prepare_checkpoints(args, work, say)
    servers: list[Server] = []
    try:
        servers.append(start_k2serve(args, k2_dir, work, say))
        servers.append(start_vllm(args, plain_dir, work, say))
        all_runs = {}
        for c in levels(args):
            prompts, lengths = make_workload(c, args.min_tokens, args.max_tokens, args.seed)
            rows = tuple({"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths))
            say(f"concurrency {c}: {sum(lengths)} output tokens per run")
            for server in servers:  # warm-up
                bench_once(server, rows[:1], 1)
            all_runs[c] = measure(servers, rows, c, args.repeats, say)
    finally:
        for server in servers:
            server.stop()
    print("output tok/s: best of the rounds (median of the rounds)\n")
    ratios = print_table(all_runs)
    print("\nk2serve/vllm serving tok/s: " + ", ".join(f"c={c} {r:.2f}" for c, r in ratios.items()))


if __name__ == "__main__":
    main()
