"""Where k2serve's engine time goes, per step, on the engine_vs_vllm workload (mla-k2-widths model).

    python benchmarks/engine_profile.py [--concurrency 1,16,64] [--dtypes float32,bfloat16] [--ops 12]

For each dtype and concurrency it runs the workload of engine_vs_vllm.py (C prompts at once, greedy,
outputs 16..256 tokens) twice: once with wall-clock timers around the engine's parts, attached from
outside (each module's `forward` and a few engine methods are wrapped on their instances; nothing in
the engine changes), and once under torch.profiler for the operator table. It prints, in ms per step:
the step's parts (schedule, batch building, attention and its pieces, MoE and its pieces, norms, lm_head,
sampling, postprocessing) and the top operators by self CPU time; "python and framework" is the step's
wall time that no operator accounts for. Timers are inclusive: a part's pieces sum to less than the part.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine_vs_hf import make_workload
from peers import K2servePeer

ATTENTION_LINEARS = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj")
# MLAttention's decode and prefill paths as named today; a path the attention no longer has is not timed.
ATTENTION_PATHS = {"decode_absorbed": "attention.decode (padded gather + absorbed MLA)",
                   "prefill_expanded": "attention.prefill (per sequence)"}


class Timers:
    """Inclusive wall time and call counts per region name."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, region: str) -> None:
        """Replace `obj.attr` (on the instance) with a timed call of the original."""
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[region] += time.perf_counter() - start
                self.calls[region] += 1

        setattr(obj, attr, timed)


class TimedSampler:
    """The engine calls its sampler as `self.sampler(...)`: wrap the object, not a method."""

    def __init__(self, sampler, timers: Timers):
        self.sampler, self.timers = sampler, timers

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.sampler(*args, **kwargs)
        self.timers.seconds["sample"] += time.perf_counter() - start
        return out


def instrument(engine, timers: Timers) -> None:
    """Time the engine's parts: its step, scheduler, runner, sampler and the model's layers."""
    from k2serve.worker import model_runner

    timers.wrap(engine, "step", "step")
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine, "_postprocess", "postprocess")
    timers.wrap(engine.runner, "execute", "execute")
    timers.wrap(model_runner, "build_forward_batch", "execute.build_batch")
    engine.sampler = TimedSampler(engine.sampler, timers)
    model = engine.runner.model
    timers.wrap(model.model.embed_tokens, "forward", "execute.embed")
    timers.wrap(model.model.norm, "forward", "execute.norms")
    timers.wrap(model, "compute_logits", "execute.lm_head")
    for layer in model.model.layers:
        instrument_layer(layer, timers)


def instrument_layer(layer, timers: Timers) -> None:
    attn = layer.self_attn
    timers.wrap(attn, "forward", "attention")
    for method, region in ATTENTION_PATHS.items():
        if hasattr(attn, method):
            timers.wrap(attn, method, region)
    for name in ATTENTION_LINEARS:
        if hasattr(attn, name):
            timers.wrap(getattr(attn, name), "forward", "attention.projections and norms")
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        timers.wrap(norm, "forward", "execute.norms")
    if not layer.is_moe:
        timers.wrap(layer.mlp, "forward", "dense mlp")
        return
    moe = layer.mlp
    timers.wrap(moe, "forward", "moe")
    timers.wrap(moe.gate, "forward", "moe.router")
    timers.wrap(moe.experts, "forward", "moe.experts (per-expert loop)")
    timers.wrap(moe.shared_experts, "forward", "moe.shared expert")
    for j in range(moe.experts.n_local_experts):
        timers.wrap(getattr(moe.experts, moe.experts.expert_name(j)), "forward", "moe.expert calls")


def timed_run(model_dir: Path, dtype: str, c: int, args) -> tuple[Timers, int, float]:
    """(timers, steps, wall seconds) of one instrumented run, after a warm-up run."""
    peer = K2servePeer(model_dir, dtype, c, 64 + args.max_tokens)
    prompts, lengths = make_workload(c, args.min_tokens, args.max_tokens, args.seed)
    peer.generate(prompts, lengths)
    timers = Timers()
    instrument(peer.engine, timers)
    run = peer.generate(prompts, lengths)
    return timers, timers.calls["step"], run.seconds


def print_breakdown(timers: Timers, steps: int, wall: float, tokens: int) -> None:
    step_ms = 1e3 * timers.seconds["step"] / steps
    print(f"{steps} steps, {tokens / wall:.1f} tok/s, {step_ms:.2f} ms per step; "
          f"expert calls per step {timers.calls['moe.expert calls'] / steps:.1f}\n")
    print("| part | ms / step | share of step |\n|---|---|---|")
    for region in sorted(timers.seconds, key=region_order):
        ms = 1e3 * timers.seconds[region] / steps
        indent = "&nbsp;&nbsp;" * region.count(".")
        print(f"| {indent}{region.split('.', 1)[-1] if '.' in region else region} | {ms:.2f} | {ms / step_ms:.0%} |")
    parts = ("schedule", "execute", "sample", "postprocess")
    rest = timers.seconds["step"] - sum(timers.seconds[p] for p in parts)
    print(f"| (step: the rest) | {1e3 * rest / steps:.2f} | {rest / timers.seconds['step']:.0%} |")


def region_order(region: str) -> tuple[int, str]:
    order = ["step", "schedule", "execute", "attention", "dense mlp", "moe", "sample", "postprocess"]
    head = region.split(".")[0]
    return (order.index(head) if head in order else len(order), region)


def profiled_run(model_dir: Path, dtype: str, c: int, args) -> None:
    """torch.profiler over one run (after a warm-up): top operators by self CPU time, per step."""
    peer = K2servePeer(model_dir, dtype, c, 64 + args.max_tokens)
    prompts, lengths = make_workload(c, args.min_tokens, args.max_tokens, args.seed)
    peer.generate(prompts, lengths)
    steps = Timers()
    steps.wrap(peer.engine, "step", "step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run = peer.generate(prompts, lengths)
    n = steps.calls["step"]
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    op_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / n
    step_ms = 1e3 * run.seconds / n
    print(f"\nunder the profiler: {step_ms:.2f} ms per step, operators {op_ms:.2f} ms, "
          f"python and framework {step_ms - op_ms:.2f} ms ({(step_ms - op_ms) / step_ms:.0%})\n")
    print("| operator | calls / step | self ms / step |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.ops]:
        print(f"| {e.key} | {e.count / n:.0f} | {e.self_cpu_time_total / 1e3 / n:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="K2-format checkpoint (default: a fresh mla-k2-widths tiny one)")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ops", type=int, default=12, help="operators to list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (engine_vs_vllm.py's default)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else _mla_model()
    for dtype in args.dtypes.split(","):
        for c in (int(x) for x in args.concurrency.split(",")):
            print(f"\n### k2serve {dtype}, concurrency {c}\n", flush=True)
            timers, steps, wall = timed_run(model_dir, dtype, c, args)
            tokens = sum(make_workload(c, args.min_tokens, args.max_tokens, args.seed)[1])
            print_breakdown(timers, steps, wall, tokens)
            profiled_run(model_dir, dtype, c, args)


def _mla_model() -> Path:
    from k2serve.cluster.tiny import make_tiny_model

    return make_tiny_model(tempfile.mkdtemp(prefix="k2serve-profile-"), seed=0, preset="mla-k2-widths")


if __name__ == "__main__":
    main()
