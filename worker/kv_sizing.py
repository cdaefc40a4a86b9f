"""KV cache sizing: how many latent-cache blocks each rank allocates, the same number on every rank.

Precedence: `num_kv_blocks` when set. Otherwise on CPU `kv_cache_memory_bytes`. Otherwise (CUDA) the
way vLLM and SGLang size it: after the weights are loaded, profile one step at the largest batch the
scheduler can form (`max_num_batched_tokens` tokens in up to `max_num_seqs` sequences, all sampling,
sampler included), then give the cache `kv_cache_fraction` of the device's total memory minus what
is in use (weights, CUDA context, NCCL buffers, other processes) and the step's peak. Every rank of
a group then takes the smallest count (a MIN all-reduce), so their block tables agree.

Memory is read through a `MemoryProbe` (the CUDA allocator on GPU; tests inject their own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from k2serve.kernels.attention_backend import MLABackend
from k2serve.worker.config import EngineConfig
from k2serve.worker.model_runner import ModelRunner, kv_cache_block_bytes
from k2serve.worker.parallel import ParallelInfo, min_over_group
from k2serve.worker.request import Request, SamplingParams
from k2serve.worker.sampler import Sampler
from k2serve.worker.scheduler import StepPlan

log = logging.getLogger(__name__)
GIB = 1 << 30


class MemoryProbe(Protocol):
    """Device memory as the KV cache sizing needs it (bytes)."""

    def total_bytes(self) -> int:
        """The device's capacity."""

    def used_bytes(self) -> int:
        """In use on the device by anyone (this process's allocator, CUDA context, other processes)."""

    def start_peak(self) -> int:
        """Reset the peak counter; returns the bytes this process has allocated now."""

    def peak_bytes(self) -> int:
        """The most bytes this process had allocated since `start_peak` (after the device finished)."""

    def release_cached(self) -> None:
        """Give memory the allocator caches but no tensor uses back to the device."""


class CudaMemoryProbe:
    """torch.cuda's allocator statistics and the driver's free/total memory of one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def total_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def used_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def start_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def release_cached(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class KVCacheSize:
    """A rank's cache: `num_blocks` blocks of `block_size` tokens, `block_bytes` each over all layers."""

    num_blocks: int
    block_size: int
    block_bytes: int
    source: str  # how it was sized, with the numbers

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self, max_model_len: int) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} = {self.num_tokens} tokens "
                f"({self.num_blocks * self.block_bytes / GIB:.2f} GiB per rank), {self.num_tokens // max_model_len} "
                f"full-length sequences of {max_model_len} tokens; {self.source}")


def profile_plan(config: EngineConfig) -> StepPlan:
    """The largest step: one prefill chunk plus single-token sequences, max_num_batched_tokens in all,
    every sequence sampling, laid out in consecutive blocks from block 0."""
    num_tokens = config.max_num_batched_tokens
    num_seqs = min(config.max_num_seqs, num_tokens)
    lengths = [num_tokens - num_seqs + 1] + [1] * (num_seqs - 1)
    plan, next_block = StepPlan(block_size=config.block_size), 0
    for i, n in enumerate(lengths):
        blocks = -(-n // config.block_size)
        plan.request_ids.append(f"profile-{i}")
        plan.token_ids.append([0] * n)
        plan.context_lens.append(0)
        plan.block_tables.append(list(range(next_block, next_block + blocks)))
        plan.sample.append(True)
        next_block += blocks
    return plan


def profile_requests(plan: StepPlan, config: EngineConfig) -> list[Request]:
    """Requests that make the sampler do its most work (filters, a draw, top logprobs)."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.01, logprobs=True,
                            top_logprobs=config.max_top_logprobs)
    return [Request(rid, [0], params) for rid in plan.request_ids]


def profile_peak(runner: ModelRunner, config: EngineConfig, probe: MemoryProbe) -> int:
    """Bytes the largest step (forward + sampler) allocates beyond what was allocated before it."""
    plan = profile_plan(config)
    runner.allocate_kv_cache(sum(len(t) for t in plan.block_tables))
    base = probe.start_peak()
    logits = runner.execute(plan).logits  # [num_seqs, vocab]
    Sampler()(logits, profile_requests(plan, config))
    peak = probe.peak_bytes() - base
    del logits
    runner.moe_stats.reset()  # the profiling step served no one
    runner.allocate_kv_cache(0)
    probe.release_cached()
    return peak


def profiled_blocks(runner: ModelRunner, config: EngineConfig, probe: MemoryProbe, block_bytes: int) -> tuple[int, str]:
    peak = profile_peak(runner, config, probe)
    total, used = probe.total_bytes(), probe.used_bytes()
    budget = int(config.kv_cache_fraction * total) - used - peak
    source = (f"{config.kv_cache_fraction:.2f} x {total / GIB:.2f} GiB total - {used / GIB:.2f} GiB in use - "
              f"{peak / GIB:.2f} GiB peak of a {config.max_num_batched_tokens}-token step = {budget / GIB:.2f} GiB")
    return max(0, budget // block_bytes), source


def local_blocks(runner: ModelRunner, config: EngineConfig, probe: MemoryProbe | None, block_bytes: int) -> tuple[int, str]:
    """This rank's block count before the group agrees, and how it was found."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks, "num_kv_blocks"
    if probe is None:
        blocks = max(1, config.kv_cache_memory_bytes // block_bytes)
        return blocks, f"kv_cache_memory_bytes {config.kv_cache_memory_bytes / GIB:.2f} GiB"
    return profiled_blocks(runner, config, probe, block_bytes)


def num_kv_blocks(model: nn.Module, config: EngineConfig, info: ParallelInfo, cache_dtype: torch.dtype,
                  probe: MemoryProbe | None, attention: MLABackend | None = None) -> int:
    """Latent-cache blocks for this rank, as the module docstring says; the same on every rank of `info`'s
    group (all of them must call it together: profiling runs the model's collectives, and the ranks agree).

    `cache_dtype` is the cache's storage dtype (an FP8 cache fits twice the blocks of a bf16 one);
    `attention` the backend the profiled step uses (default: the one for the device).
    """
    profiler = ModelRunner(model, 0, config.block_size, cache_dtype, config.device, info=info,
                           attention=attention)  # broadcasts nothing
    block_bytes = kv_cache_block_bytes(model.config, config.block_size, cache_dtype)
    blocks, source = local_blocks(profiler, config, probe, block_bytes)
    agreed = min_over_group(blocks, info)  # before any rank gives up, so that none waits for it
    if agreed != blocks:
        source += f"; {blocks} here, {agreed} on the group's smallest rank"
    if agreed < 1:
        raise RuntimeError(f"no memory left for the KV cache: {source}, less than one block ({block_bytes} "
                           f"bytes); raise kv_cache_fraction or lower max_num_batched_tokens")
    if info.is_driver:
        size = KVCacheSize(agreed, config.block_size, block_bytes, source)
        log.info(size.describe(config.max_model_len or model.config.max_position_embeddings))
    return agreed
