"""`k2serve plan`: print the capacity plan of one worker group as tables, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from k2serve.cluster.efficiency import Efficiency
from k2serve.cluster.expert_load import rank_imbalance_from_expert_counts
from k2serve.cluster.gpus import GB, GIB, GPUS, gpu_spec
from k2serve.cluster.layout import LayoutReport, best_layout, compare_layouts
from k2serve.cluster.plan import Plan, PlanConfig, StepCost, build_plan, mixed_output_rate
from k2serve.cluster.plan_step import link_bandwidth
from k2serve.worker.model.config import ModelConfig


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="capacity plan: memory, KV capacity and step times per GPU",
                              description=__doc__)
    d = PlanConfig()
    p.add_argument("--model-config", help="config.json (or a checkpoint dir); default: Kimi K2 Instruct")
    p.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), type=str.upper)
    p.add_argument("--num-gpus", type=int, default=None, help=f"GPUs per worker group = EP size (default {d.num_gpus})")
    p.add_argument("--ep", type=int, default=None, help="expert parallelism = the group's size (same as --num-gpus)")
    p.add_argument("--tp", type=int, default=None,
                   help="attention tensor parallelism, dividing the group (default: the group; 1 = data-parallel)")
    p.add_argument("--dp-attention", action="store_true", help="data-parallel attention (same as --tp 1)")
    p.add_argument("--shared-experts", default=d.shared_experts, choices=["replicated", "tp"])
    p.add_argument("--context-len", type=int, default=d.context_len)
    p.add_argument("--batch", type=int, default=d.batch, help="target decode batch (sequences per group)")
    p.add_argument("--kv-len", type=int, default=None, help="cached tokens per sequence in the decode step")
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens,
                   help="prefill chunk per attention partition")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt length within a prefill chunk")
    p.add_argument("--isl", type=int, default=None, help="with --osl: mixed prefill + decode output rate")
    p.add_argument("--osl", type=int, default=None, help="output tokens per request (with --isl)")
    p.add_argument("--dispatch-dtype", default=d.dispatch_dtype, choices=["fp8", "bf16"])
    p.add_argument("--reserve-gib", type=float, default=d.fixed_reserve_gib)
    p.add_argument("--collective-latency-us", type=float, default=d.collective_latency_us)
    p.add_argument("--overlap", action="store_true", help="overlap compute and communication (two micro-batches)")
    p.add_argument("--ideal", action="store_true", help="no efficiency derating: the pure roofline")
    p.add_argument("--rank-imbalance", type=float, default=None, help="measured max/mean token copies per rank")
    p.add_argument("--expert-counts", help="JSON [layer][expert] token counts; sets --rank-imbalance from them")
    p.add_argument("--layouts", action="store_true", help="compare every attention TP size and name the best")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", help="write a PNG of tokens/s per GPU and per user versus batch")
    p.set_defaults(func=run)
    return p


def group_size(args: argparse.Namespace) -> int:
    if args.ep is not None and args.num_gpus is not None and args.ep != args.num_gpus:
        raise ValueError(f"--ep {args.ep} must equal --num-gpus {args.num_gpus}: experts are split over the whole group")
    return args.ep or args.num_gpus or PlanConfig().num_gpus


def rank_imbalance(args: argparse.Namespace, num_gpus: int) -> float | None:
    if args.expert_counts is None:
        return args.rank_imbalance
    counts = json.loads(Path(args.expert_counts).read_text())
    return rank_imbalance_from_expert_counts(counts if isinstance(counts[0], list) else [counts], num_gpus)


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    w = group_size(args)
    tp = 1 if args.dp_attention else (args.tp or w)
    kv_len = args.kv_len if args.kv_len is not None or args.isl is None else args.isl + (args.osl or 0) // 2
    return PlanConfig(
        gpu=args.gpu, num_gpus=w, tp_size=tp, shared_experts=args.shared_experts,
        context_len=args.context_len, batch=args.batch, kv_len=kv_len, prefill_tokens=args.prefill_tokens,
        prompt_len=args.prompt_len or args.isl, dispatch_dtype=args.dispatch_dtype,
        fixed_reserve_gib=args.reserve_gib, collective_latency_us=args.collective_latency_us,
        overlap=args.overlap, rank_imbalance=rank_imbalance(args, w),
        efficiency=Efficiency.ideal() if args.ideal else Efficiency(),
    )


def load_model(path: str | None) -> ModelConfig:
    """Kimi K2 Instruct's numbers by default, else a config.json file or a directory holding one."""
    if path is None:
        return ModelConfig()
    p = Path(path)
    return ModelConfig.from_dir(p) if p.is_dir() else ModelConfig.from_dict(json.loads(p.read_text()))


def run(args: argparse.Namespace) -> int:
    """Entry point of `k2serve plan`."""
    try:
        if (args.isl is None) != (args.osl is None):
            raise ValueError("--isl and --osl go together")
        cfg = config_from_args(args)
        model = load_model(args.model_config)
        plan = build_plan(model, cfg, gpu_spec(cfg.gpu))
        layouts = compare_layouts(model, cfg) if args.layouts else []
    except (ValueError, OSError) as e:
        print(f"k2serve plan: {e}", file=sys.stderr)
        return 2
    mixed = mixed_rate(plan, args.isl, args.osl)
    if args.json:
        print(json.dumps(plan_to_dict(plan, layouts, mixed), indent=2))
    else:
        print_plan(plan, sys.stdout, mixed)
        if layouts:
            print_layouts(layouts, sys.stdout)
    if args.plot:
        plot_plan(plan, args.plot)
    return 0


def mixed_rate(plan: Plan, isl: int | None, osl: int | None) -> float | None:
    if isl is None or osl is None:
        return None
    return mixed_output_rate(plan.decode, plan.prefill, plan.config.batch, isl, osl, plan.config.num_gpus)


def _step_dict(s: StepCost) -> dict[str, Any]:
    out = dataclasses.asdict(s)
    for name in ("step_s", "compute_s", "comm_s", "comm_bytes", "hbm_bytes", "flops", "num_collectives", "bound"):
        out[name] = getattr(s, name)
    return out


def plan_to_dict(
    plan: Plan, layouts: list[LayoutReport] | None = None, mixed: float | None = None
) -> dict[str, Any]:
    out = dataclasses.asdict(plan)
    out["decode"], out["prefill"] = _step_dict(plan.decode), _step_dict(plan.prefill)
    out["decode_tokens_per_s_per_gpu"] = plan.decode_tokens_per_s_per_gpu
    out["prefill_tokens_per_s_per_gpu"] = plan.prefill_tokens_per_s_per_gpu
    if mixed is not None:
        out["mixed_output_tokens_per_s_per_gpu"] = mixed
    if layouts:
        out["layouts"] = [dataclasses.asdict(r) for r in layouts]
        out["best_tp_size"] = best_layout(layouts).tp_size
    out["units"] = "bytes, seconds, FLOPs; *_gib fields in GiB (2**30 bytes)"
    return out


def _table(rows: list[tuple[Any, ...]], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        out.write("\n")
    out.write("\n")


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def print_plan(plan: Plan, out: TextIO, mixed: float | None = None) -> None:
    """Human-readable tables; memory in GiB (2**30 bytes), rates in decimal units."""
    c, g = plan.config, plan.gpu
    out.write(f"{c.num_gpus}x{g.name}, attention TP {c.tp_size} x DP {c.dp_size}, EP {c.num_gpus}, "
              f"shared experts {c.shared_experts}; {plan.total_params / 1e9:.1f}B params, "
              f"{plan.active_params / 1e9:.1f}B active\n\n")
    print_memory(plan, out)
    print_steps(plan, out, mixed)
    rows = [("batch", "step ms", "tok/s/GPU", "tok/s/user", "bound", f"KV fits at {c.decode_kv_len}")]
    rows += [(p.batch, f"{p.step_ms:.2f}", f"{p.tokens_per_s_per_gpu:.0f}", f"{p.tokens_per_s_per_user:.1f}",
              p.bound, "yes" if p.fits_kv else "no") for p in plan.sweep]
    _table(rows, out)


def print_memory(plan: Plan, out: TextIO) -> None:
    c = plan.config
    rows = [("weights per GPU", "params (B)", "GiB")]
    rows += [(k.name, f"{k.params_per_gpu / 1e9:.3f}", _gib(k.bytes_per_gpu)) for k in plan.weights]
    rows.append(("total", f"{sum(k.params_per_gpu for k in plan.weights) / 1e9:.3f}", _gib(plan.weights_per_gpu_bytes)))
    _table(rows, out)
    _table([
        ("memory per GPU", "GiB"),
        ("capacity (CUDA-visible)", _gib(plan.capacity_bytes)),
        ("free after weights", _gib(plan.free_after_weights_bytes)),
        ("reserve (workspace + activations)", _gib(plan.reserve_bytes)),
        ("KV cache", _gib(plan.kv_tokens_per_gpu * plan.kv_bytes_per_token)),
    ], out)
    out.write(f"KV cache: {plan.kv_bytes_per_token:,} bytes/token; {plan.kv_tokens_per_gpu:,} tokens per GPU, "
              f"{plan.kv_tokens_per_group:,} per group ({c.dp_size} partition(s)); {plan.max_sequences} sequences of "
              f"{c.context_len:,} tokens; fits: {'yes' if plan.fits else 'NO'}\n")
    out.write(f"all-to-all: {plan.a2a_bytes_per_token_per_layer:,.0f} bytes/token/MoE layer ({c.dispatch_dtype} rows "
              f"+ int32 id + fp32 weight out, bf16 back; uniform routing) over "
              f"{link_bandwidth(plan.gpu, c.num_gpus) / GB:.0f} GB/s per GPU\n\n")


def print_steps(plan: Plan, out: TextIO, mixed: float | None) -> None:
    c, e = plan.config, plan.config.efficiency
    _table([("step", "tokens", "HBM GB", "TFLOP", "comm GB", "colls", "compute ms", "comm ms", "step ms",
             "tok/s/GPU", "bound")]
           + [_step_row(n, s, c.num_gpus) for n, s in (("decode", plan.decode), ("prefill", plan.prefill))], out)
    load = plan.decode.load
    out.write(f"decode experts, slowest of {c.num_gpus} ranks: {load.max_copies:.1f} token copies (mean "
              f"{load.mean_copies:.1f}, x{load.imbalance:.2f}), {load.max_experts:.1f} distinct experts (mean "
              f"{load.mean_experts:.1f}) per MoE layer; routing "
              f"{'uniform' if c.rank_imbalance is None else f'measured imbalance {c.rank_imbalance:.2f}'}\n")
    out.write(f"assumptions: overlap {'on' if c.overlap else 'off'}, {c.collective_latency_us:g} us per collective, "
              f"efficiency {', '.join(f'{k} {v:g}' for k, v in dataclasses.asdict(e).items())}\n")
    if mixed is not None:
        out.write(f"mixed prefill + decode (in-flight batching) at batch {c.batch}: {mixed:,.0f} output tok/s/GPU\n")
    out.write("\n")
    rows = [("decode collectives", "group", "per step", "KB each", "ms per step")]
    rows += [(k.name, k.group_size, k.per_step, f"{k.bytes_each / 1e3:,.1f}", f"{k.total_s * 1e3:.2f}")
             for k in plan.decode.collectives]
    _table(rows, out)


def _step_row(name: str, s: StepCost, num_gpus: int) -> tuple[Any, ...]:
    return (name, s.tokens, f"{s.hbm_bytes / GB:.1f}", f"{s.flops / 1e12:.2f}", f"{s.comm_bytes / GB:.3f}",
            s.num_collectives, f"{s.compute_s * 1e3:.2f}", f"{s.comm_s * 1e3:.2f}", f"{s.step_s * 1e3:.2f}",
            f"{s.tokens / s.step_s / num_gpus:.0f}", s.bound)


def print_layouts(layouts: list[LayoutReport], out: TextIO) -> None:
    rows = [("tp x dp", "weights GiB", "KV tok/GPU", "seqs 128K", "seqs 2K", "decode 128K tok/s/GPU",
             "decode 2K tok/s/GPU (batch)", "prefill tok/s/GPU")]
    rows += [(f"{r.tp_size} x {r.dp_size}", _gib(r.weights_per_gpu_bytes), f"{r.kv_tokens_per_gpu:,}",
              r.sequences_long, r.sequences_short, f"{r.decode_long_tokens_per_s_per_gpu:,.0f}",
              f"{r.decode_short_tokens_per_s_per_gpu:,.0f} ({r.decode_short_batch})",
              f"{r.prefill_tokens_per_s_per_gpu:,.0f}") for r in layouts]
    _table(rows, out)
    best = best_layout(layouts)
    out.write(f"best layout: tp {best.tp_size} x dp {best.dp_size}\n")


def plot_plan(plan: Plan, path: str) -> None:
    """tokens/s per GPU versus tokens/s per user along the batch sweep (the serving trade-off curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    batches = [p.batch for p in plan.sweep]
    ax1.loglog(batches, [p.tokens_per_s_per_gpu for p in plan.sweep], "o-", label="tokens/s per GPU")
    ax1.loglog(batches, [p.tokens_per_s_per_user for p in plan.sweep], "s-", label="tokens/s per user")
    ax1.set_xlabel("decode batch (sequences per group)")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    fits = [p for p in plan.sweep if p.fits_kv]
    ax2.plot([p.tokens_per_s_per_user for p in plan.sweep], [p.tokens_per_s_per_gpu for p in plan.sweep], "o-")
    if fits:
        ax2.plot([p.tokens_per_s_per_user for p in fits], [p.tokens_per_s_per_gpu for p in fits], "o",
                 color="green", label="KV cache fits")
        ax2.legend()
    ax2.set_xlabel("tokens/s per user")
    ax2.set_ylabel("tokens/s per GPU")
    ax2.grid(True, alpha=0.3)
    c = plan.config
    fig.suptitle(f"{c.num_gpus}x{plan.gpu.name}, TP{c.tp_size}xDP{c.dp_size}, kv_len {c.decode_kv_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
