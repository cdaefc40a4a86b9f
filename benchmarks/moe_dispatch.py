"""MoE dispatch benchmark (issue 4): the all-to-all dispatcher against the all-gather baseline.

Not a test: run it by hand; it prints three plain-text tables.

  1. Bytes per MoE layer, computed from the routing of the timing runs (not measured), and checked
     equal to the bytes the dispatchers hand to their collectives during one forward (TrafficCounter).
  2. Median ms per MoE layer on gloo: W ranks spawned on this box (torch.multiprocessing + gloo on
     127.0.0.1, no Ray), the real `MoE` layer at the tiny config with random weights, at a few token
     counts per rank. Before timing, both dispatchers must agree with each other and with one process
     holding every expert.
  3. Kimi K2 shapes (hidden 7168, top-8 of 384 experts, 60 MoE layers), computed: bytes per decode
     token per layer and over all MoE layers, on 8 ranks, for today's dispatcher and for the planned
     wire format (the bytes `k2serve plan` assumes, from the same function), then the same for wider
     expert parallelism.

The byte formulas, and what "bytes moved" means, are in k2serve.cluster.moe_wire (the all-to-all wire
formats, shared with the planner) and benchmarks/dispatch_bytes.py (the all-gather baseline, routings).

    python benchmarks/moe_dispatch.py [--quick] [--world 2 4] [--tokens 1 8 64 256] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import k2serve.worker.model.layers.dispatcher as dispatcher_module
from dispatch_bytes import (
    LayerBytes,
    WireFormat,
    bytes_per_layer,
    expected_remote_copies,
    expected_remote_ranks,
    num_moe_layers,
    per_token_bytes,
    remote_copies,
)
from k2serve.cluster.tiny import tiny_config_dict
from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.moe import MoE
from k2serve.worker.parallel import ParallelInfo

DISPATCHER_NAMES = ("all_to_all", "all_gather")


# ---------------------------------------------------------------- measured on gloo


@dataclass(frozen=True)
class TimingConfig:
    """One timing run: W ranks, tokens per rank to sweep, repeats, dtype, and the tiny config's hidden size."""

    world_size: int
    tokens_per_rank: tuple[int, ...]
    warmup: int
    repeats: int
    dtype: str = "bf16"
    hidden_size: int | None = None
    seed: int = 0
    start_method: str = "fork"  # fork starts ranks without re-importing torch; spawn is the cautious choice

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(hidden_size: int | None) -> ModelConfig:
    """The tiny K2-shaped config (hidden 192, top-4 of 16 experts), optionally with another hidden size."""
    overrides = {} if hidden_size is None else {"hidden_size": hidden_size}
    return ModelConfig.from_dict(tiny_config_dict(**overrides))


def init_moe_weights(moe: torch.nn.Module, seed: int) -> None:
    """Normal(0, 1/sqrt(fan_in)) weights seeded by parameter name, so an expert (named by its global id)
    and the replicated gate and shared expert get the same values on every rank and in one process."""
    for name, p in moe.named_parameters():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if p.dim() == 2:
            values = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
        else:
            values = 0.01 * torch.randn(p.shape, generator=gen)  # e_score_correction_bias: only selects
        p.data.copy_(values.to(p.dtype))


def build_moe(config: ModelConfig, info: ParallelInfo, dtype: torch.dtype, dispatcher: str, seed: int) -> MoE:
    moe = MoE(config, info, dtype, dispatcher=dispatcher)
    init_moe_weights(moe, seed)
    return moe.eval()


class TrafficCounter:
    """Stands in for torch.distributed in the dispatcher module during one forward and adds up the bytes
    each collective sends off this rank (the same definition as the formulas); everything else delegates."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.bytes_sent = rank, world_size, 0

    def __getattr__(self, name: str):
        return getattr(dist, name)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        splits = input_split_sizes or [input.shape[0] // self.world_size] * self.world_size
        row_bytes = input.element_size() * math.prod(input.shape[1:])
        self.bytes_sent += (input.shape[0] - splits[self.rank]) * row_bytes  # our own split stays here
        return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, **kwargs)

    def all_gather_into_tensor(self, output, input, **kwargs):
        self.bytes_sent += (self.world_size - 1) * input.nbytes
        return dist.all_gather_into_tensor(output, input, **kwargs)

    def reduce_scatter_tensor(self, output, input, **kwargs):
        self.bytes_sent += input.nbytes - output.nbytes  # every chunk but the one this rank keeps
        return dist.reduce_scatter_tensor(output, input, **kwargs)


@contextmanager
def counting_traffic(rank: int, world_size: int) -> Iterator[TrafficCounter]:
    """Count the dispatchers' collectives on this rank for the duration of the block."""
    counter, saved = TrafficCounter(rank, world_size), dispatcher_module.dist
    dispatcher_module.dist = counter
    try:
        yield counter
    finally:
        dispatcher_module.dist = saved


def rank_inputs(cfg: TimingConfig, n: int, hidden: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's [n, H] shard, all ranks' [W * n, H]), drawn from one generator shared by every rank."""
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * n)
    all_x = torch.randn(cfg.world_size * n, hidden, generator=gen).to(cfg.torch_dtype)  # [W * n, H]
    return all_x[rank * n : (rank + 1) * n], all_x


class RankBench:
    """One rank's MoE layer under each dispatcher, plus a one-process MoE holding every expert as reference."""

    def __init__(self, cfg: TimingConfig, rank: int, group):
        self.cfg, self.rank, self.group = cfg, rank, group
        self.config = model_config(cfg.hidden_size)
        info = ParallelInfo(rank, cfg.world_size, group)
        self.moes = {name: build_moe(self.config, info, cfg.torch_dtype, name, cfg.seed) for name in DISPATCHER_NAMES}
        self.reference = build_moe(self.config, ParallelInfo(), cfg.torch_dtype, "local", cfg.seed)

    def measure_tokens(self, n: int) -> dict:
        """Check agreement, count bytes and time both dispatchers at n tokens per rank."""
        x, all_x = rank_inputs(self.cfg, n, self.config.hidden_size, self.rank)
        err, counted = self.check_agreement(x, all_x)
        topk = self.gather_routing(x)
        fmt = WireFormat(self.config.hidden_size, act_bytes=self.cfg.torch_dtype.itemsize)
        nbytes = bytes_per_layer(topk, self.config.n_routed_experts, fmt)
        for name, sent in counted.items():
            if sent != nbytes[name].total:
                raise AssertionError(f"{name} sent {sent} bytes at W={self.cfg.world_size}, {n} tokens per rank; "
                                     f"the formula says {nbytes[name].total}")
        n_local = self.config.n_routed_experts // self.cfg.world_size
        row = {"world": self.cfg.world_size, "tokens_per_rank": n, "rel_err": err,
               "remote_copies": remote_copies(topk, n_local)}
        for name, moe in self.moes.items():
            row[f"{name}_ms"] = self.time_forward(moe, x)
            row[f"{name}_bytes"] = nbytes[name].total
            row[f"{name}_bytes_counted"] = counted[name]
        return row

    def check_agreement(self, x: torch.Tensor, all_x: torch.Tensor) -> tuple[float, dict[str, int]]:
        """(largest |dispatcher - one process| over dispatchers and ranks relative to max |reference|,
        bytes each dispatcher sent over all ranks). Raises on every rank alike above the dtype's tolerance.
        """
        n = x.shape[0]
        with torch.inference_mode():
            reference = self.reference(all_x)[self.rank * n : (self.rank + 1) * n].float()  # [n, H]
            outputs, counted = [], {}
            for name, moe in self.moes.items():
                with counting_traffic(self.rank, self.cfg.world_size) as counter:
                    outputs.append(moe(x).float())  # [n, H]
                counted[name] = self.sum_over_ranks(counter.bytes_sent)
        scale = reference.abs().max().clamp(min=1e-6)
        err = torch.tensor([max(float((y - reference).abs().max() / scale) for y in outputs)])
        dist.all_reduce(err, op=dist.ReduceOp.MAX, group=self.group)
        tol = 5e-2 if self.cfg.dtype == "bf16" else 1e-4
        if float(err) > tol:
            raise AssertionError(
                f"dispatchers disagree with one process at W={self.cfg.world_size}, {n} tokens per rank: "
                f"relative error {float(err):.3g} > {tol}"
            )
        return float(err), counted

    def sum_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return int(t)

    def gather_routing(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's topk ids [n, k] for its input, on every rank."""
        with torch.inference_mode():
            topk_ids, _ = self.reference.gate(x)  # [n, k]; the gate is replicated, identical everywhere
        out = topk_ids.new_empty((self.cfg.world_size * topk_ids.shape[0], topk_ids.shape[1]))  # [W * n, k]
        dist.all_gather_into_tensor(out, topk_ids.contiguous(), group=self.group)
        return list(out.chunk(self.cfg.world_size))

    def time_forward(self, moe: MoE, x: torch.Tensor) -> float:
        """Median over repeats of the slowest rank's wall time for one MoE forward, in ms."""
        times = torch.zeros(self.cfg.repeats, dtype=torch.float64)
        with torch.inference_mode():
            for i in range(self.cfg.warmup + self.cfg.repeats):
                dist.barrier(group=self.group)
                start = time.perf_counter()
                moe(x)
                if i >= self.cfg.warmup:
                    times[i - self.cfg.warmup] = (time.perf_counter() - start) * 1e3
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        return statistics.median(times.tolist())


def run_rank(rank: int, cfg: TimingConfig, port: int, out_path: str) -> None:
    """One spawned rank: join the gloo group, sweep the token counts, rank 0 writes the rows as JSON."""
    torch.set_num_threads(1)
    # the dispatchers use all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 flags as deprecated
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.world_size)
    try:
        bench = RankBench(cfg, rank, dist.group.WORLD)
        rows = [bench.measure_tokens(n) for n in cfg.tokens_per_rank]
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure(cfg: TimingConfig) -> list[dict]:
    """Spawn cfg.world_size gloo ranks on this box and return rank 0's rows (one per token count)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "rows.json")
        mp.start_processes(run_rank, args=(cfg, free_port(), out_path), nprocs=cfg.world_size,
                           start_method=cfg.start_method)
        return json.loads(Path(out_path).read_text())


# ---------------------------------------------------------------- tables


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned."""
    cells = [headers] + [[c if isinstance(c, str) else f"{c:,}" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bytes_table(rows: list[dict]) -> str:
    headers = ["W", "tokens/rank", "remote copies", "all-to-all B", "all-gather B", "a2a / ag"]
    body = [[str(r["world"]), r["tokens_per_rank"], r["remote_copies"], int(r["all_to_all_bytes"]),
             int(r["all_gather_bytes"]), f"{r['all_to_all_bytes'] / r['all_gather_bytes']:.2f}"] for r in rows]
    return format_table(headers, body)


def timing_table(rows: list[dict]) -> str:
    headers = ["W", "tokens/rank", "all-to-all ms", "all-gather ms", "ag / a2a", "rel err vs 1 rank"]
    body = [[str(r["world"]), r["tokens_per_rank"], f"{r['all_to_all_ms']:.3f}", f"{r['all_gather_ms']:.3f}",
             f"{r['all_gather_ms'] / r['all_to_all_ms']:.2f}", f"{r['rel_err']:.1e}"] for r in rows]
    return format_table(headers, body)


def k2_rows(config: ModelConfig, world_size: int) -> list[tuple[str, str, LayerBytes]]:
    """(dispatcher, payload, bytes per token per layer) for K2 at world_size ranks."""
    bf16, fp8 = per_token_bytes(config, world_size, False), per_token_bytes(config, world_size, True)
    return [
        ("all-to-all today", "bf16", bf16["all_to_all"]),
        ("all-to-all planned", "bf16", bf16["all_to_all_target"]),
        ("all-to-all planned", "fp8 dispatch", fp8["all_to_all_target"]),
        ("all-gather (baseline)", "bf16", bf16["all_gather"]),
        ("one copy per rank*", "bf16", bf16["per_rank_copy"]),
        ("one copy per rank*", "fp8 dispatch", fp8["per_rank_copy"]),
    ]


def k2_table(config: ModelConfig, world_size: int) -> str:
    layers = num_moe_layers(config)
    headers = ["dispatcher", "payload", "dispatch B", "routing B", "combine B", "B/token/layer", f"KB/token x{layers}"]
    body = [[name, payload, round(b.dispatch), round(b.routing), round(b.combine), round(b.total),
             f"{b.total * layers / 1e3:,.1f}"] for name, payload, b in k2_rows(config, world_size)]
    return format_table(headers, body)


def k2_width_table(config: ModelConfig, widths: tuple[int, ...] = (8, 16, 32, 64)) -> str:
    headers = ["W", "remote copies", "a2a today B", "planned bf16 B", "planned fp8 B", "all-gather B", "ag / a2a today"]
    body = []
    for w in widths:
        rows = {f"{n} {p}": b.total for n, p, b in k2_rows(config, w)}
        a2a = rows["all-to-all today bf16"]
        body.append([str(w), f"{expected_remote_copies(config.num_experts_per_tok, w):.3f}", round(a2a),
                     round(rows["all-to-all planned bf16"]), round(rows["all-to-all planned fp8 dispatch"]),
                     round(rows["all-gather (baseline) bf16"]), f"{rows['all-gather (baseline) bf16'] / a2a:.2f}"])
    return format_table(headers, body)


def payload_summary(config: ModelConfig, world_size: int) -> str:
    """The dispatcher's payload per token per MoE layer, today and as `k2serve plan` assumes it."""
    today = per_token_bytes(config, world_size, False)["all_to_all"].total
    planned = {p: per_token_bytes(config, world_size, p == "fp8")["all_to_all_target"].total for p in ("bf16", "fp8")}
    return (f"dispatcher payload per token per MoE layer at W={world_size}: today {today:,.0f} B "
            f"(bf16 rows, int64 ids, weights kept home); planned {planned['bf16']:,.0f} B with bf16 rows, "
            f"{planned['fp8']:,.0f} B with fp8 rows (int32 ids, fp32 weights; what `k2serve plan` assumes)")


def print_k2_tables() -> None:
    k2 = ModelConfig()  # Kimi K2 Instruct defaults
    remote = expected_remote_copies(k2.num_experts_per_tok, 8)
    print(f"\nKimi K2 on 8 ranks, per decode token, uniform routing: {remote:.3f} of "
          f"{k2.num_experts_per_tok} copies leave the rank (count exchange of 8*7*8 = 448 B/layer not included)")
    print(k2_table(k2, 8))
    print(f"* one copy per destination rank (DeepEP-style, not implemented): "
          f"{expected_remote_ranks(k2.n_routed_experts, k2.num_experts_per_tok, 8):.3f} remote ranks per token, "
          f"ids + weights ride along")
    print(payload_summary(k2, 8))
    print("\nKimi K2, bytes per decode token per MoE layer vs expert-parallel width")
    print(k2_width_table(k2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer token counts and repeats (a few seconds per W)")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="ranks per timing run")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per rank (default 1 8 64 256)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--hidden-size", type=int, default=None, help="override the tiny config's hidden size (192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-method", choices=["fork", "spawn"], default="fork",
                   help="how ranks start: fork (fast) or spawn (each rank imports torch afresh)")
    return p.parse_args(argv)


def timing_configs(args: argparse.Namespace) -> list[TimingConfig]:
    tokens = tuple(args.tokens or ((1, 8, 64) if args.quick else (1, 8, 64, 256)))
    warmup, repeats = (1, 5) if args.quick else (2, 10)
    return [TimingConfig(w, tokens, warmup, repeats, args.dtype, args.hidden_size, args.seed, args.start_method)
            for w in args.world]


def main(argv: list[str] | None = None) -> None:
    """Run the timing sweeps, then print the bytes, timing and K2 tables."""
    args = parse_args(argv)
    rows = []
    for cfg in timing_configs(args):
        start = time.perf_counter()
        rows += measure(cfg)
        elapsed = time.perf_counter() - start
        print(f"W={cfg.world_size}: {len(cfg.tokens_per_rank)} token counts timed in {elapsed:.1f} s")
    config = model_config(args.hidden_size)
    print(f"Tiny config: hidden {config.hidden_size}, top-{config.num_experts_per_tok} of "
          f"{config.n_routed_experts} experts, {args.dtype}; gloo on {torch.get_num_threads()} CPU threads here")
    print("\nBytes per MoE layer, computed from the routing of the timed inputs "
          "(checked equal to the bytes the dispatchers handed to their collectives)")
    print(bytes_table(rows))
    print(f"\nMedian ms per MoE layer (slowest rank per repeat), gloo on {os.cpu_count()} cores")
    if max(args.world) > (os.cpu_count() or 1):
        print("note: more ranks than cores; those rows time the OS scheduler as much as the dispatchers")
    print(timing_table(rows))
    print_k2_tables()


if __name__ == "__main__":
    main()
