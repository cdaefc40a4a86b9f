"""KV cache sizing (worker/kv_sizing.py) with an injected memory probe, the device choices
(worker/device.py), the one runner construction path (worker/runner_loader.py) sizing in the cache's dtype
with the serving attention backend, and kv_cache_fraction wired from the cluster config to every rank's
engine config."""

from __future__ import annotations

import logging

import pytest
import torch

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.group import WorkerGroup
from k2serve.kernels.attention_backend import TorchMLABackend, TritonMLABackend
from k2serve.kernels.latent_cache import FP8_KV_DTYPE
from k2serve.worker import runner_loader
from k2serve.worker.config import EngineConfig
from k2serve.worker.device import activation_dtype, attention_backend, cache_dtype, fp8_backend, memory_probe
from k2serve.worker.kv_sizing import CudaMemoryProbe, num_kv_blocks, profile_plan
from k2serve.worker.loader import load_model
from k2serve.worker.model_runner import kv_cache_block_bytes
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.rank_worker import RankWorker

MIB = 1 << 20


class RecordingProbe:
    """A device of `total` bytes with `used` in use whose profiled step peaks `peak` bytes; it logs the
    calls (and, through a forward hook, the model's forwards) in order."""

    def __init__(self, total: int, used: int, peak: int):
        self.total, self.used, self.peak, self.events = total, used, peak, []

    def total_bytes(self) -> int:
        self.events.append("total")
        return self.total

    def used_bytes(self) -> int:
        self.events.append("used")
        return self.used

    def start_peak(self) -> int:
        self.events.append("start_peak")
        return 5 * MIB

    def peak_bytes(self) -> int:
        self.events.append("peak")
        return 5 * MIB + self.peak

    def release_cached(self) -> None:
        self.events.append("release")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, progress=False)


def watch_forwards(model, probe: RecordingProbe):
    return model.register_forward_pre_hook(lambda _, args: probe.events.append(("forward", args[0].numel())))


def block_bytes(model, config: EngineConfig) -> int:
    return kv_cache_block_bytes(model.config, config.block_size, torch.float32)


def test_profile_plan_is_the_largest_step():
    config = EngineConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=16)
    plan = profile_plan(config)
    assert plan.num_tokens == 100 and plan.num_seqs == 8 and all(plan.sample)
    assert [len(t) for t in plan.token_ids] == [93] + [1] * 7
    blocks = [b for table in plan.block_tables for b in table]
    assert blocks == list(range(len(blocks))) == list(range(6 + 7))  # 93 tokens -> 6 blocks, then 1 each
    assert profile_plan(EngineConfig(max_num_batched_tokens=3, max_num_seqs=8)).num_seqs == 3


def test_profiled_size_is_fraction_of_total_minus_used_minus_peak(model):
    config = EngineConfig(max_num_batched_tokens=48, max_num_seqs=4, kv_cache_fraction=0.75)
    probe = RecordingProbe(total=40 * MIB, used=6 * MIB, peak=3 * MIB)
    hook = watch_forwards(model, probe)
    try:
        blocks = num_kv_blocks(model, config, ParallelInfo(), torch.float32, probe)
    finally:
        hook.remove()
    assert blocks == (30 * MIB - 6 * MIB - 3 * MIB) // block_bytes(model, config)
    # the peak brackets one forward at the largest batch; the memory in use is read after it was released
    assert probe.events == ["start_peak", ("forward", 48), "peak", "release", "total", "used"]


def test_num_kv_blocks_overrides_and_cpu_sizes_by_bytes(model):
    probe = RecordingProbe(total=40 * MIB, used=6 * MIB, peak=3 * MIB)
    assert num_kv_blocks(model, EngineConfig(num_kv_blocks=7), ParallelInfo(), torch.float32, probe) == 7
    assert probe.events == []  # nothing profiled
    config = EngineConfig(kv_cache_memory_bytes=3 * MIB)
    assert num_kv_blocks(model, config, ParallelInfo(), torch.float32, None) == 3 * MIB // block_bytes(model, config)


def test_no_room_for_one_block_is_a_clear_error(model):
    probe = RecordingProbe(total=40 * MIB, used=19 * MIB, peak=2 * MIB)
    with pytest.raises(RuntimeError, match=r"no memory left for the KV cache: 0.50 x 0.04 GiB total .* = -0.00 GiB, less than one block .* raise kv_cache_fraction"):
        num_kv_blocks(model, EngineConfig(kv_cache_fraction=0.5), ParallelInfo(), torch.float32, probe)


def test_log_says_tokens_and_full_length_sequences(model, caplog):
    config = EngineConfig(num_kv_blocks=40, block_size=16, max_model_len=128)
    with caplog.at_level(logging.INFO, logger="k2serve.worker.kv_sizing"):
        num_kv_blocks(model, config, ParallelInfo(), torch.float32, None)
    assert "40 blocks x 16 = 640 tokens" in caplog.text and "5 full-length sequences of 128 tokens" in caplog.text


def test_device_choices():
    cpu, cuda = EngineConfig(device="cpu"), EngineConfig(device="cuda")
    assert activation_dtype(cpu) == torch.float32 and activation_dtype(cuda) == torch.bfloat16
    assert activation_dtype(EngineConfig(device="cuda", dtype="float32")) == torch.float32
    assert fp8_backend(cpu) is None and fp8_backend(cuda) == "auto"
    assert fp8_backend(EngineConfig(weight_format="fp8")) == "auto"
    assert fp8_backend(EngineConfig(device="cuda:1", weight_format="dense")) is None
    assert memory_probe(cpu) is None and isinstance(memory_probe(cuda), CudaMemoryProbe)
    assert cache_dtype(cpu) == torch.float32 and cache_dtype(cuda) == torch.bfloat16
    assert cache_dtype(EngineConfig(device="cuda", kv_cache_dtype="fp8_e4m3")) == FP8_KV_DTYPE
    assert isinstance(attention_backend(cpu), TorchMLABackend)
    assert isinstance(attention_backend(cuda), TritonMLABackend)


class RecordingBackend(TorchMLABackend):
    """The CPU attention backend, counting the steps whose decodes it planned."""

    def __init__(self):
        self.planned = 0

    def plan_decode(self, *args):
        self.planned += 1
        return super().plan_decode(*args)


def test_load_runner_sizes_in_the_cache_dtype_with_the_serving_backend(tiny_model_dir, monkeypatch):
    """An FP8 cache: the profiled budget is divided by FP8 block bytes (4x the float32 blocks), the caches
    are FP8, and the profiled step ran through the attention backend the runner then serves with."""
    backend = RecordingBackend()
    monkeypatch.setattr(runner_loader, "attention_backend", lambda config: backend)
    config = EngineConfig(max_num_batched_tokens=48, max_num_seqs=4, kv_cache_fraction=0.75,
                          kv_cache_dtype="fp8_e4m3")
    probe = RecordingProbe(total=40 * MIB, used=6 * MIB, peak=3 * MIB)
    runner = runner_loader.load_runner(tiny_model_dir, config, probe=probe)
    fp8_block = kv_cache_block_bytes(runner.model.config, config.block_size, FP8_KV_DTYPE)
    assert runner.num_blocks == (30 * MIB - 6 * MIB - 3 * MIB) // fp8_block
    assert runner.num_blocks >= 4 * ((30 * MIB - 6 * MIB - 3 * MIB) // block_bytes(runner.model, config))
    assert all(c.dtype == FP8_KV_DTYPE for c in runner.kv_caches)
    assert runner.attention is backend and backend.planned == 1  # the profiled step's decodes
    assert probe.events[:2] == ["start_peak", "peak"]  # a profiled step, not kv_cache_memory_bytes


@pytest.mark.parametrize("field, value", [("kv_cache_fraction", 0.0), ("kv_cache_fraction", 1.5),
                                          ("dtype", "fp8"), ("weight_format", "int4")])
def test_engine_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_kv_cache_fraction_reaches_every_rank_of_a_cuda_group():
    """k8s/cluster.yaml's engine section -> the group -> each rank's spec -> the engine config it runs, on the
    group's device (the engine section names none)."""
    from pathlib import Path

    config = ClusterConfig.from_file(Path(__file__).parent.parent / "k8s" / "cluster.yaml")
    section = config.groups[0]
    group = WorkerGroup(section, "/models/k2", config.engine)
    workers = [RankWorker(group.rank_spec(r)) for r in range(section.tp)]
    assert [w.spec.rank for w in workers] == list(range(8))
    for worker in workers:
        assert worker.engine.kv_cache_fraction == 0.85 and worker.engine.device == "cuda"
        assert worker.spec.backend == "nccl" and isinstance(worker.probe, CudaMemoryProbe)
        assert activation_dtype(worker.engine) == torch.bfloat16 and fp8_backend(worker.engine) == "auto"
    cpu = RankWorker(WorkerGroup(ClusterConfig().groups[0], "/m", ClusterConfig().engine).rank_spec(1))
    assert cpu.engine.device == "cpu" and cpu.spec.backend == "gloo" and cpu.probe is None
