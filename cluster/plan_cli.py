"""`k2serve plan`: print the capacity plan of one worker group as tables, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from k2serve.cluster.gpus import GB, GIB, GPUS, gpu_spec
from k2serve.cluster.plan import Plan, PlanConfig, StepCost, build_plan
from k2serve.worker.model.config import ModelConfig


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="capacity plan: memory, KV capacity and roofline per GPU",
                              description=__doc__)
    d = PlanConfig()
    p.add_argument("--model-config", help="config.json (or a checkpoint dir); default: Kimi K2 Instruct")
    p.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), type=str.upper)
    p.add_argument("--num-gpus", type=int, default=d.num_gpus, help="GPUs per worker group")
    p.add_argument("--tp", type=int, default=None,
                   help="attention tensor parallelism (default: num-gpus; 1 = data-parallel attention)")
    p.add_argument("--ep", type=int, default=None, help="expert parallelism; must equal num-gpus")
    p.add_argument("--dp-attention", action="store_true", help="data-parallel attention (same as --tp 1)")
    p.add_argument("--shared-experts", default=d.shared_experts, choices=["replicated", "tp"])
    p.add_argument("--context-len", type=int, default=d.context_len)
    p.add_argument("--batch", type=int, default=d.batch, help="target decode batch (sequences per group)")
    p.add_argument("--kv-len", type=int, default=None, help="cached tokens per sequence in the decode roofline")
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens)
    p.add_argument("--dispatch-dtype", default=d.dispatch_dtype, choices=["fp8", "bf16"])
    p.add_argument("--reserve-gib", type=float, default=d.fixed_reserve_gib)
    p.add_argument("--collective-latency-us", type=float, default=d.collective_latency_us)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", help="write a PNG of tokens/s per GPU and per user versus batch")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    tp = 1 if args.dp_attention else (args.tp or args.num_gpus)
    if args.ep is not None and args.ep != args.num_gpus:
        raise ValueError(f"--ep {args.ep} must equal --num-gpus {args.num_gpus}: experts are split over the whole group")
    return PlanConfig(
        gpu=args.gpu, num_gpus=args.num_gpus, tp_size=tp, shared_experts=args.shared_experts,
        context_len=args.context_len, batch=args.batch, kv_len=args.kv_len,
        prefill_tokens=args.prefill_tokens, dispatch_dtype=args.dispatch_dtype,
        fixed_reserve_gib=args.reserve_gib, collective_latency_us=args.collective_latency_us,
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
        cfg = config_from_args(args)
        plan = build_plan(load_model(args.model_config), cfg, gpu_spec(cfg.gpu))
    except ValueError as e:
        print(f"k2serve plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        print_plan(plan, sys.stdout)
    if args.plot:
        plot_plan(plan, args.plot)
    return 0


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    out = dataclasses.asdict(plan)
    out["decode"]["step_s"] = plan.decode.step_s
    out["prefill"]["step_s"] = plan.prefill.step_s
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


def print_plan(plan: Plan, out: TextIO) -> None:
    """Human-readable tables; memory in GiB (2**30 bytes), rates in decimal units."""
    c, g = plan.config, plan.gpu
    out.write(f"{c.num_gpus}x{g.name}, TP {c.tp_size} x DP {c.dp_size} attention, EP {c.num_gpus}, "
              f"shared experts {c.shared_experts}; {plan.total_params / 1e9:.1f}B params, "
              f"{plan.active_params / 1e9:.1f}B active\n\n")
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
              f"{plan.kv_tokens_per_group:,} per group; {plan.max_sequences} sequences of {c.context_len:,} tokens; "
              f"fits: {'yes' if plan.fits else 'NO'}\n")
    out.write(f"all-to-all: {plan.a2a_bytes_per_token_per_layer:,} bytes/token/MoE layer ({c.dispatch_dtype} dispatch "
              f"+ bf16 combine); per layer at batch {c.batch}: {plan.a2a_ms_per_layer_nvlink:.3f} ms over NVLink "
              f"({g.nvlink_bandwidth / GB:.0f} GB/s), {plan.a2a_ms_per_layer_rdma:.3f} ms over RDMA "
              f"({g.rdma_bandwidth / GB:.0f} GB/s)\n\n")
    _table([("step", "tokens", "HBM GB", "TFLOP", "comm GB", "mem ms", "compute ms", "comm ms", "step ms", "bound")]
           + [_step_row(n, s) for n, s in (("decode", plan.decode), ("prefill", plan.prefill))], out)
    rows = [("batch", "step ms", "tok/s/GPU", "tok/s/user", "bound", f"KV fits at {c.decode_kv_len}")]
    rows += [(p.batch, f"{p.step_ms:.2f}", f"{p.tokens_per_s_per_gpu:.0f}", f"{p.tokens_per_s_per_user:.1f}",
              p.bound, "yes" if p.fits_kv else "no") for p in plan.sweep]
    _table(rows, out)


def _step_row(name: str, s: StepCost) -> tuple[Any, ...]:
    return (name, s.tokens, f"{s.hbm_bytes / GB:.1f}", f"{(s.fp8_flops + s.bf16_flops) / 1e12:.2f}",
            f"{s.comm_bytes / GB:.3f}", f"{s.memory_s * 1e3:.2f}", f"{s.compute_s * 1e3:.2f}",
            f"{s.comm_s * 1e3:.2f}", f"{s.step_s * 1e3:.2f}", s.bound)


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
    fig.suptitle(f"roofline: {c.num_gpus}x{plan.gpu.name}, TP{c.tp_size}xDP{c.dp_size}, kv_len {c.decode_kv_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
