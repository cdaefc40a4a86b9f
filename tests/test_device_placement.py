"""Every tensor the step creates names its device: the engine runs with torch's default device set to
`meta` while the model, cache and batch live on CPU, so a tensor created without an explicit device is a
meta tensor and fails (or computes nothing) when it meets a real one, as a CPU tensor would on CUDA.

One process, and a TP = EP = 2 group over gloo (two forked processes, no Ray), both with KV cache sizing
by a profiled step (an injected memory probe), MoE statistics collected on every step, and greedy tokens
equal to an ordinary single-process run. The one-process run also goes through the CUDA attention path
(the Triton backend, under the interpreter) over an FP8 latent cache.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import traceback

import pytest
import torch
from prometheus_client import CollectorRegistry

# The Triton attention backend runs under the interpreter on CPU; this must precede triton's first import.
os.environ["TRITON_INTERPRET"] = "1"

from k2serve.kernels.backend import select_attention_backend  # noqa: E402
from k2serve.kernels.latent_cache import FP8_KV_DTYPE  # noqa: E402
from k2serve.worker.config import EngineConfig  # noqa: E402
from k2serve.worker.distributed import free_port, init_distributed  # noqa: E402
from k2serve.worker.engine import Engine  # noqa: E402
from k2serve.worker.kv_sizing import num_kv_blocks  # noqa: E402
from k2serve.worker.loader import load_model  # noqa: E402
from k2serve.worker.metrics import WorkerMetrics  # noqa: E402
from k2serve.worker.model_runner import ModelRunner, kv_cache_block_bytes  # noqa: E402
from k2serve.worker.parallel import ParallelInfo  # noqa: E402
from k2serve.worker.plan_channel import BroadcastingRunner, PlanChannel, follow  # noqa: E402
from k2serve.worker.request import SamplingParams  # noqa: E402
from k2serve.worker.vocab import Vocab  # noqa: E402

MIB = 1 << 20
# Small steps so that a prompt is chunked; a repeated prompt hits the prefix cache.
CONFIG = EngineConfig(max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4, block_size=16,
                      kv_cache_fraction=0.5)
PROMPTS = [list(range(5, 45)), [7, 8, 9], list(range(5, 45)), [300, 2, 1000, 40, 41, 42, 43]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# (attention backend, latent cache dtype): the CPU path, and the CUDA one (Triton kernel, FP8 cache).
VARIANTS = {"torch-float32": ("torch", torch.float32), "triton-fp8": ("triton", FP8_KV_DTYPE)}


class FakeProbe:
    """A device of `total` bytes with `used` in use; a profiled step peaks `peak` bytes above its start."""

    def __init__(self, total: int, used: int, peak: int):
        self.total, self.used, self.peak = total, used, peak

    def total_bytes(self) -> int:
        return self.total

    def used_bytes(self) -> int:
        return self.used

    def start_peak(self) -> int:
        return 1000

    def peak_bytes(self) -> int:
        return 1000 + self.peak

    def release_cached(self) -> None:
        pass


def expected_blocks(probe: FakeProbe, model_config, cache_dtype: torch.dtype = torch.float32) -> int:
    block = kv_cache_block_bytes(model_config, CONFIG.block_size, cache_dtype)
    return (int(CONFIG.kv_cache_fraction * probe.total) - probe.used - probe.peak) // block


def moe_layers(config) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def collected_expert_tokens(registry, layer: int) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == "k2serve_worker_expert_tokens_total" and s.labels["layer"] == str(layer))


def sample(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"group": "g", **labels}) or 0.0


def ordinary_run(model_dir, attention: str = "torch", cache_dtype: torch.dtype = torch.float32):
    """Greedy tokens of a one-process run with the default device untouched."""
    model = load_model(model_dir, torch.float32, progress=False)
    vocab = Vocab.from_model_dir(model_dir, model.config.vocab_size)
    backend = select_attention_backend(torch.device("cpu"), attention)
    runner = ModelRunner(model, 64, CONFIG.block_size, cache_dtype, attention=backend)
    return Engine(CONFIG, runner, vocab).generate(PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return ordinary_run(tiny_model_dir)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_process_under_meta_default_device(tiny_model_dir, variant):
    attention, cache_dtype = VARIANTS[variant]
    want = ordinary_run(tiny_model_dir, attention, cache_dtype)
    model = load_model(tiny_model_dir, torch.float32, progress=False)
    vocab = Vocab.from_model_dir(tiny_model_dir, model.config.vocab_size)
    probe = FakeProbe(total=64 * MIB, used=16 * MIB, peak=4 * MIB)
    metrics = WorkerMetrics(CollectorRegistry(), "g")
    backend = select_attention_backend(torch.device("cpu"), attention)
    with torch.device("meta"):
        blocks = num_kv_blocks(model, CONFIG, ParallelInfo(), cache_dtype, probe, backend)  # profiles a step
        runner = ModelRunner(model, blocks, CONFIG.block_size, cache_dtype, attention=backend)
        engine = Engine(CONFIG, runner, vocab, metrics, moe_stats_interval_s=0.0)
        got = engine.generate(PROMPTS, GREEDY)
        engine.step()  # idle: nothing left to collect
    assert got == want
    assert runner.num_blocks == expected_blocks(probe, model.config, cache_dtype)
    assert all(c.device.type == "cpu" and c.dtype == cache_dtype for c in runner.kv_caches)
    computed = sample(metrics.registry, "k2serve_worker_batch_size_tokens_sum")
    assert computed > 0
    for layer in moe_layers(model.config):
        assert collected_expert_tokens(metrics.registry, layer) == computed * model.config.num_experts_per_tok


def run_rank(rank: int, port: int, model_dir: str, total: int, results) -> None:
    """One rank of a 2-rank group: load outside the meta context (the loader stages through host memory),
    then size the cache and serve steps with meta as the default device."""
    try:
        torch.set_num_threads(1)
        info = init_distributed(rank, 2, "127.0.0.1", port, "gloo", 60.0)
        model = load_model(model_dir, torch.float32, info, progress=False)
        probe = FakeProbe(total=total, used=16 * MIB, peak=4 * MIB)
        with torch.device("meta"):
            blocks = num_kv_blocks(model, CONFIG, info, torch.float32, probe)
            if rank == 0:
                runner = BroadcastingRunner(PlanChannel(info), model, blocks, CONFIG.block_size, info=info)
                results.put((rank, blocks, *serve(model, runner, model_dir)))
            else:
                runner = ModelRunner(model, blocks, CONFIG.block_size, info=info)
                results.put((rank, blocks, follow(runner, PlanChannel(info))))
    except BaseException:  # reported to the test instead of a silent exit code
        results.put((rank, "error", traceback.format_exc()))


def serve(model, runner: BroadcastingRunner, model_dir: str):
    """Rank 0: generate through the group; the tokens and what the metrics recorded."""
    metrics = WorkerMetrics(CollectorRegistry(), "g")
    engine = Engine(CONFIG, runner, Vocab.from_model_dir(model_dir, model.config.vocab_size), metrics, 0.0)
    tokens = engine.generate(PROMPTS, GREEDY)
    runner.stop_followers()
    reg = metrics.registry
    counts = {layer: collected_expert_tokens(reg, layer) for layer in moe_layers(model.config)}
    traffic = {phase: (sample(reg, "k2serve_worker_all_to_all_bytes_total", phase=phase),
                       sample(reg, "k2serve_worker_all_to_all_duration_seconds_count", phase=phase))
               for phase in ("dispatch", "combine")}
    return tokens, counts, traffic, sample(reg, "k2serve_worker_batch_size_tokens_sum")


def test_tp2_ep2_group_under_meta_default_device(tiny_model_dir, reference):
    ctx = mp.get_context("fork")
    results, port = ctx.Queue(), free_port()
    totals = (64 * MIB, 56 * MIB)  # rank 1 has less memory: both ranks must take its block count
    procs = [ctx.Process(target=run_rank, args=(r, port, str(tiny_model_dir), totals[r], results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = {}
        while len(got) < 2:
            item = results.get(timeout=240)
            assert item[1] != "error", f"rank {item[0]} failed:\n{item[2]}"
            got[item[0]] = item
    except queue_module.Empty:
        pytest.fail("the group did not finish within 240 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    model_config = load_model(tiny_model_dir, torch.float32, progress=False).config
    _, blocks0, tokens, counts, traffic, computed = got[0]
    _, blocks1, steps = got[1]
    assert tokens == reference
    assert blocks0 == blocks1 == expected_blocks(FakeProbe(totals[1], 16 * MIB, 4 * MIB), model_config)
    assert steps > 0
    k = model_config.num_experts_per_tok
    assert computed > 0 and all(c == computed * k for c in counts.values())  # both ranks' routing, no padding
    for phase, (num_bytes, timed) in traffic.items():
        assert num_bytes > 0 and timed > 0, phase
