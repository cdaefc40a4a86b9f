"""The engine phases of benchmarks/gpu_smoke.py: the tiny model against CPU float32, and the K2-width slice
at batch 1 / 64 / 256 beside `k2serve plan`'s prediction. Each phase reports through `emit(record)`.

Tolerance of the serving configuration (bfloat16 activations and cache, FP8 weights through the device's
kernels, the device's attention backend: the Triton decode kernel on CUDA) against CPU float32 on the tiny
model: teacher-forced logits within 4 x 2^-4 relative error in norm at every sequence, through the prefill
path (every position of one chunk) and through the decode path (one decode per token), the bound
tests/test_kernels_model_parity.py derives for FP8 activations (each quantized matmul adds ~2.5% relative
noise; over 3 layers they also flip some expert choices).

Tolerance of the FP8 (e4m3) latent cache against the bf16 cache, both served as above, on teacher-forced
decodes: mean |logit difference| <= 2^-3 of mean |logit| and the top token agreeing at >= 75% of positions,
the bound tests/test_kv_cache_fp8.py states (e4m3 rounds each cached value by up to 2^-4).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from k2serve.cluster.gpus import gpu_spec
from k2serve.cluster.plan import PlanConfig, build_plan
from k2serve.cluster.tiny import make_tiny_model
from k2serve.worker.config import EngineConfig
from k2serve.worker.distributed import free_port
from k2serve.worker.engine import Engine
from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.deepseek_v3 import allocate_kv_caches
from k2serve.worker.model_runner import build_forward_batch
from k2serve.worker.rank_worker import RankSpec, RankWorker
from k2serve.worker.request import SamplingParams
from k2serve.worker.scheduler import StepPlan

Emit = Callable[[dict], None]
GIB = 1 << 30
LOGITS_REL_TOL = 4 * 2.0**-4
FP8_CACHE_MEAN_TOL, FP8_CACHE_TOP1 = 2.0**-3, 0.75
TINY_PROMPTS = [[5, 77, 300, 12, 900, 1000, 4, 8], list(range(100, 140)), [7, 8, 9], list(range(600, 621))]


def check(emit: Emit, name: str, ok: bool, detail: str) -> None:
    emit({"kind": "check", "name": name, "ok": bool(ok), "detail": detail})


def note(emit: Emit, text: str) -> None:
    emit({"kind": "note", "text": text})


def rank_engine(model_dir: Path, config: EngineConfig) -> Engine:
    """Rank 0 of a world of one, as a worker group starts it (NCCL on CUDA, gloo on CPU)."""
    worker = RankWorker(RankSpec(0, 1, str(model_dir), config, config.device, 120.0))
    worker.join("127.0.0.1", free_port())
    worker.load()
    return worker.build_engine()


@torch.inference_mode()
def teacher_logits(model, ids: list[int], device: str) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of every position of `ids` (one prefill, a fresh cache), on CPU."""
    blocks = -(-len(ids) // 16)
    plan = StepPlan(["x"], [ids], [0], [list(range(blocks))], [True], 16)
    batch = build_forward_batch(plan, device)
    caches = allocate_kv_caches(model.config, blocks, 16, model.dtype, device)
    hidden = model(batch.input_ids, batch.positions, batch.attn, caches)
    return model.compute_logits(hidden).float().cpu()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        same = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), None)
        if same is not None:
            return f"prompt {i} differs from token {same} ({x[same]} vs {y[same]})"
    return "identical"


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """The synchronising CUDA calls `fn` makes (torch's sync debug mode), as file:line of the caller."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


@torch.inference_mode()
def decode_logits(runner, ids: list[int], num_prompt: int) -> torch.Tensor:
    """[len(ids) - num_prompt + 1, vocab] float32 logits on CPU: the prompt's prefill, then one decode per
    following token of `ids` (teacher-forced), through the runner's cache and attention backend."""
    bs = runner.block_size
    table = list(range(-(-len(ids) // bs)))
    plans = [StepPlan(["x"], [ids[:num_prompt]], [0], [table], [True], bs)]
    plans += [StepPlan(["x"], [[t]], [pos], [table], [True], bs) for pos, t in enumerate(ids) if pos >= num_prompt]
    return torch.cat([runner.execute(plan).logits.cpu() for plan in plans])


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))


def top1(got: list[torch.Tensor], want: list[torch.Tensor]) -> str:
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    return f"top-1 agreement {agree}/{sum(w.shape[0] for w in want)}"


def tiny_phase(emit: Emit, device: str, workdir: Path, smoke: bool) -> None:
    model_dir = make_tiny_model(workdir / "tiny", seed=0)
    greedy = SamplingParams(temperature=0, max_tokens=4 if smoke else 24, ignore_eos=True)
    reference = Engine.from_model_dir(model_dir, EngineConfig(dtype="float32", num_kv_blocks=64))
    want = reference.generate(TINY_PROMPTS, greedy)
    exact = Engine.from_model_dir(model_dir, EngineConfig(device=device, dtype="float32", weight_format="dense",
                                                          num_kv_blocks=64))
    got = exact.generate(TINY_PROMPTS, greedy)
    check(emit, f"tiny float32, dense weights, on {device} ({exact.runner.attention.name} attention): greedy "
          f"tokens equal the CPU float32 run", got == want, first_divergence(got, want))
    serving_config = EngineConfig(device=device, num_kv_blocks=64,
                                  **({"dtype": "bfloat16", "weight_format": "fp8"} if smoke else {}))
    serving = rank_engine(model_dir, serving_config)
    served = serving.generate(TINY_PROMPTS, greedy)
    fp8 = Engine.from_model_dir(model_dir, serving_config.model_copy(update={"kv_cache_dtype": "fp8_e4m3"}))
    fp8_served = fp8.generate(TINY_PROMPTS, greedy)
    # the teacher-forced runs below write the runners' caches directly: the engines serve nothing after them
    sequences = [(prompt + tokens, len(prompt)) for prompt, tokens in zip(TINY_PROMPTS, want)]
    check_serving(emit, reference.runner, serving.runner, sequences, first_divergence(served, want))
    check_fp8_cache(emit, serving.runner, fp8.runner, sequences, first_divergence(fp8_served, served))
    if device.startswith("cuda"):
        count_syncs(emit, serving.runner)


def check_serving(emit: Emit, reference, runner, sequences, greedy: str) -> None:
    """The served configuration's logits against CPU float32, through prefill and through decode."""
    model = runner.model
    ref = [teacher_logits(reference.model, ids, "cpu") for ids, _ in sequences]
    prefill = [teacher_logits(model, ids, str(runner.device)) for ids, _ in sequences]
    ref_decode = [decode_logits(reference, ids, n) for ids, n in sequences]
    decode = [decode_logits(runner, ids, n) for ids, n in sequences]
    rel_prefill, rel_decode = rel_error(prefill, ref), rel_error(decode, ref_decode)
    check(emit, f"tiny served as on GPU ({model.dtype}, FP8 weights via {fp8_name(model)}, "
          f"{runner.attention.name} attention) within the FP8 tolerance of CPU float32",
          max(rel_prefill, rel_decode) <= LOGITS_REL_TOL,
          f"teacher-forced logits rel. error: prefill {rel_prefill:.3f}, {top1(prefill, ref)}; decode "
          f"{rel_decode:.3f}, {top1(decode, ref_decode)} (bound {LOGITS_REL_TOL}); greedy: {greedy}")


def check_fp8_cache(emit: Emit, bf16, fp8, sequences, greedy: str) -> None:
    """The FP8 latent cache against the served cache dtype, on teacher-forced decodes."""
    want = [decode_logits(bf16, ids, n) for ids, n in sequences]
    got = [decode_logits(fp8, ids, n) for ids, n in sequences]
    mean = float(sum((g - w).abs().sum() for g, w in zip(got, want)) / sum(w.abs().sum() for w in want))
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    total = sum(w.shape[0] for w in want)
    check(emit, f"FP8 (e4m3) latent cache ({fp8.kv_caches[0].dtype}) within its tolerance of the "
          f"{bf16.kv_caches[0].dtype} cache, {fp8.attention.name} attention",
          mean <= FP8_CACHE_MEAN_TOL and agree >= FP8_CACHE_TOP1 * total,
          f"mean |logit diff| / mean |logit| {mean:.3f} (bound {FP8_CACHE_MEAN_TOL}); top-1 agreement "
          f"{agree}/{total} (bound {FP8_CACHE_TOP1:.0%}); greedy: {greedy}")


def fp8_name(model) -> str:
    linear = model.model.layers[0].self_attn.o_proj
    return linear.fp8.backend.name if linear.fp8 is not None else "none (dense)"


def count_syncs(emit: Emit, runner) -> None:
    """Host synchronisations of one forward of the served model over a mixed step: a 300-token prefill and
    4 decodes over 8 cached tokens (the step's metadata is built first, as the runner does once per step)."""
    model, device = runner.model, runner.device
    plan = StepPlan([f"r{i}" for i in range(5)], [[1]] * 4 + [[2] * 300], [8] * 4 + [0],
                    [[i] for i in range(4)] + [list(range(4, 4 + 300 // 16 + 1))], [True] * 5, 16)
    batch = build_forward_batch(plan, device, runner.attention)
    caches = allocate_kv_caches(model.config, 24, 16, runner.kv_caches[0].dtype, device)
    with torch.inference_mode():
        sites = host_syncs(lambda: model(batch.input_ids, batch.positions, batch.attn, caches))
    moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    check(emit, f"host synchronisations in one forward (prefill + decodes, {runner.attention.name} attention): "
          f"at most one per MoE layer", len(sites) <= moe,
          f"{len(sites)} ({', '.join(sorted(set(sites))) or 'none'}); {moe} MoE layers")


# ---------------------------------------------------------------- the K2-width slice


def plan_for(model_config: ModelConfig, batch: int, kv_len: int, config: EngineConfig):
    """`k2serve plan` for the slice on one H200 (world size 1), batch `batch`, `kv_len` cached tokens."""
    cfg = PlanConfig(gpu="H200", num_gpus=1, tp_size=1, batch=batch, context_len=kv_len, kv_len=kv_len,
                     prefill_tokens=config.max_num_batched_tokens)
    return build_plan(model_config, cfg, gpu_spec("H200"))


def run_batch(engine: Engine, batch: int, prompt_len: int, warmup: int, steps: int) -> dict:
    """Prefill `batch` prompts, then time `steps` decode steps after `warmup`; returns the measurements."""
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 2, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", torch.randint(0, 1000, (prompt_len,), generator=gen).tolist(), params)
    cuda = engine.runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    prefill_s = time.perf_counter() - start
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()  # ends with the sampled tokens on the host: the step is complete
        times.append(time.perf_counter() - start)
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    return {"batch": batch, "prefill_s": prefill_s, "step_ms": step_s * 1e3, "tok_s": batch / step_s, "peak_gib": peak}


def slice_phase(emit: Emit, device: str, workdir: Path, smoke: bool, deadline: float) -> None:
    from slice_checkpoint import K2_SLICE, SMOKE_SLICE, write_slice_checkpoint

    start = time.perf_counter()
    model_dir = write_slice_checkpoint(workdir / "slice", SMOKE_SLICE if smoke else K2_SLICE, torch.device(device))
    note(emit, f"slice checkpoint written in {time.perf_counter() - start:.0f}s")
    config = EngineConfig(device=device, max_num_seqs=256, max_num_batched_tokens=256 if smoke else 8192,
                          block_size=64, max_model_len=32768, **({"kv_cache_memory_bytes": 64 << 20} if smoke else {}))
    start = time.perf_counter()
    engine = rank_engine(model_dir, config)
    model_config = engine.runner.model.config
    kv_tokens = engine.runner.num_blocks * config.block_size
    weights = torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else None
    prompt_len, warmup, steps = (16, 1, 2) if smoke else (64, 3, 16)
    plan = plan_for(model_config, 1, prompt_len + warmup + steps, config)
    emit({"kind": "summary", "load_s": time.perf_counter() - start, "kv_tokens": kv_tokens,
          "kv_sequences": kv_tokens // config.max_model_len, "plan_kv_tokens": plan.kv_tokens_per_gpu,
          "weights_gib": weights, "plan_weights_gib": plan.weights_per_gpu_bytes / GIB})
    for batch in ((1, 4, 8) if smoke else (1, 64, 256)):
        if time.perf_counter() > deadline:
            note(emit, f"batch {batch} skipped: the phase's time budget is spent")
            continue
        row = run_batch(engine, batch, prompt_len, warmup, steps)
        predicted = plan_for(model_config, batch, prompt_len + warmup + steps, config).decode
        emit({"kind": "row", **row, "plan_step_ms": predicted.step_s * 1e3, "plan_tok_s": batch / predicted.step_s})
