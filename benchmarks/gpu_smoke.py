"""Everything GPU-specific in one command, on one H200, in under 5 minutes; appends a report to RESULTS.md.

    python benchmarks/gpu_smoke.py              # on CUDA
    python benchmarks/gpu_smoke.py --cpu-smoke  # tiny shapes on CPU (Triton interpreter): the same plumbing

Three phases, each in its own process with its own time budget, so that a failure, a hang or a crash
in one still leaves the others' results in the report:
  kernels  benchmarks/gpu_kernels.py: every FP8 kernel and the MLA attention kernels (paged decode, chunked
           prefill) checked against their torch references, then timed at K2's shapes against bf16 matmuls,
           the batched torch decode and the measured ceilings (timings stop when the budget is spent).
  tiny     the tiny K2-format checkpoint through the engine on the device: float32 with dense weights must
           give the CPU float32 run's greedy tokens exactly; the serving configuration (dtype auto =
           bfloat16, FP8 weights on the Triton kernels, the Triton paged decode kernel, started as rank 0
           of a world of one over NCCL) must stay within the FP8 tolerance stated in smoke_engine.py
           through prefill and decode; an FP8 (e4m3) latent cache within its stated tolerance of the bf16
           cache; host synchronisations of one forward (prefill + decodes) are counted (torch's CUDA sync
           debug mode): at most one per MoE layer.
  slice    a K2-width slice (slice_checkpoint.py: K2's widths, 384 experts top-8, 2 layers, random FP8
           weights written as a K2 checkpoint) loaded and served like a rank: KV cache sized by the profiled
           step (kv_cache_fraction), decode at batch 1 / 64 / 256: tokens/s, step time, peak memory and
           the KV tokens that fit, beside `k2serve plan`'s prediction for the same slice on one H200.
Exit status: 0 when every phase finished and every check passed, 2 otherwise, 1 without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PHASES = ("kernels", "tiny", "slice")
GPU_BUDGET_S = {"kernels": 80, "tiny": 70, "slice": 130}  # 280 s with the processes' start-up
CPU_BUDGET_S = {"kernels": 240, "tiny": 240, "slice": 240}


@dataclass
class PhaseResult:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s"
    seconds: float
    records: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and all(r["ok"] for r in self.records if r["kind"] == "check")


# ---------------------------------------------------------------- one phase (a child process)


def run_phase(name: str, out: Path, smoke: bool, budget_s: float) -> int:
    """Run phase `name`, appending each result to `out` as a JSON line as soon as it exists."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("k2serve.worker.kv_sizing").setLevel(logging.INFO)  # the KV cache's size

    sys.path.insert(0, str(ROOT / "benchmarks"))
    device = "cpu" if smoke else "cuda"
    deadline = time.perf_counter() + budget_s - 15  # leave time to report

    def emit(record: dict) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")

    with tempfile.TemporaryDirectory(prefix=f"k2serve-smoke-{name}-") as tmp:
        if name == "kernels":
            return kernels_phase(emit, smoke, deadline - time.perf_counter(), Path(tmp))
        import smoke_engine

        torch.manual_seed(0)
        if name == "tiny":
            smoke_engine.tiny_phase(emit, device, Path(tmp), smoke)
        else:
            smoke_engine.slice_phase(emit, device, Path(tmp), smoke, deadline)
    return 0


def kernels_phase(emit, smoke: bool, budget_s: float, tmp: Path) -> int:
    import gpu_kernels

    report = tmp / "kernels.md"
    code = gpu_kernels.main((["--cpu-smoke"] if smoke else []) + ["--results", str(report),
                                                                  "--budget-s", str(max(10.0, budget_s - 40))])
    emit({"kind": "text", "text": report.read_text().strip() if report.exists() else "(no report)"})
    emit({"kind": "check", "name": "kernels match their torch references", "ok": code == 0,
          "detail": f"gpu_kernels.py exit status {code}"})
    return 0


# ---------------------------------------------------------------- the driver


def launch(name: str, smoke: bool, budget_s: float, workdir: Path) -> PhaseResult:
    out = workdir / f"{name}.jsonl"
    cmd = [sys.executable, __file__, "--phase", name, "--out", str(out), "--budget-s", str(budget_s)]
    start = time.perf_counter()
    print(f"== phase {name} (budget {budget_s:.0f}s)", flush=True)
    try:
        code = subprocess.run(cmd + (["--cpu-smoke"] if smoke else []), timeout=budget_s).returncode
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {budget_s:.0f}s"
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return PhaseResult(name, status, time.perf_counter() - start, records)


def format_rows(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["kind"] == "row"]
    if not rows:
        return []
    lines = ["| batch | step ms | tokens/s | plan step ms | plan tokens/s | measured / plan | prefill s | peak GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['plan_step_ms']:.3f} | "
                     f"{r['plan_tok_s']:.0f} | {r['tok_s'] / r['plan_tok_s']:.0%} | {r['prefill_s']:.2f} | {peak} |")
    return lines


def format_summary(r: dict) -> str:
    weights = f"{r['weights_gib']:.1f} GiB allocated after loading (plan {r['plan_weights_gib']:.1f} GiB); " \
        if r["weights_gib"] is not None else ""
    return (f"- loaded and sized in {r['load_s']:.0f}s; {weights}KV cache {r['kv_tokens']:,} tokens = "
            f"{r['kv_sequences']} sequences of 32,768 (plan: {r['plan_kv_tokens']:,} tokens per GPU)")


def format_phase(p: PhaseResult) -> str:
    parts = [f"### {p.name}: {'ok' if p.ok else 'FAILED'} ({p.status}, {p.seconds:.0f}s)", ""]
    for r in p.records:
        if r["kind"] == "text":
            parts += [r["text"], ""]
        elif r["kind"] == "check":
            parts.append(f"- check {'ok' if r['ok'] else 'FAILED'}: {r['name']} ({r['detail']})")
        elif r["kind"] == "note":
            parts.append(f"- {r['text']}")
        elif r["kind"] == "summary":
            parts.append(format_summary(r))
    rows = format_rows(p.records)
    return "\n".join(parts + ([""] + rows if rows else [])) + "\n"


def format_report(card: str, versions: str, phases: list[PhaseResult]) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(p.seconds for p in phases)
    head = [f"## {stamp}, gpu_smoke on {card}", "", f"{versions}; {total:.0f}s in all.", ""]
    return "\n".join(head) + "\n".join(format_phase(p) for p in phases)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (the test suite runs this)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"append the report here (default {DEFAULT_RESULTS.relative_to(ROOT)} on CUDA, nothing on CPU)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.phase:
        try:
            return run_phase(args.phase, args.out, args.cpu_smoke, args.budget_s)
        except Exception:
            traceback.print_exc()
            with open(args.out, "a") as f:
                f.write(json.dumps({"kind": "check", "name": f"phase {args.phase} ran to its end", "ok": False,
                                    "detail": traceback.format_exc(limit=3).strip().splitlines()[-1]}) + "\n")
            return 3
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_smoke: CUDA is required (run it on the H200); nothing measured. Use --cpu-smoke on a CPU machine.")
        return 1
    card = "CPU (smoke run, Triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name()
    budgets = CPU_BUDGET_S if args.cpu_smoke else GPU_BUDGET_S
    with tempfile.TemporaryDirectory(prefix="k2serve-smoke-") as tmp:
        phases = [launch(name, args.cpu_smoke, budgets[name], Path(tmp)) for name in args.phases.split(",")]
    report = format_report(card, f"torch {torch.__version__}", phases)
    print(report)
    target = args.results or (None if args.cpu_smoke else DEFAULT_RESULTS)
    if target is not None:
        with open(target, "a") as f:
            f.write("\n" + report)
        print(f"appended to {target}")
    return 0 if all(p.ok for p in phases) else 2


if __name__ == "__main__":
    sys.exit(main())
