"""ModelRunner: turns a StepPlan into one forward pass over the paged latent cache (runs on every rank).

StepPlan (plain lists) -> ForwardBatch (tensors + AttentionMetadata) -> ForwardResult: the logits of
the sequences that sample this step (the last token of a completed prefill chunk, or a decode) and,
when the plan asks, the group's MoE statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from k2serve.kernels.attention_backend import MLABackend
from k2serve.kernels.backend import select_attention_backend
from k2serve.worker.model.attention_metadata import AttentionMetadata
from k2serve.worker.model.deepseek_v3 import allocate_kv_caches
from k2serve.worker.model.layers.moe_stats import MoEStatsCollector, MoEStatsSnapshot
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.scheduler import StepPlan


@dataclass
class ForwardBatch:
    """The tensors of one step: T new tokens of B sequences, N of which sample."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [N] int64: rows of the hidden states whose logits are needed


@dataclass
class ForwardResult:
    """What one plan produced on this rank."""

    logits: torch.Tensor | None  # [N, vocab] float32 of the sampling sequences; None when none samples
    moe_stats: MoEStatsSnapshot | None = None  # the group's MoE statistics, when the plan collected them


def kv_cache_block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers: layers * block_size * (kv_lora_rank + qk_rope_head_dim)."""
    return config.num_hidden_layers * block_size * config.kv_cache_dim * dtype.itemsize


def build_forward_batch(plan: StepPlan, device: torch.device | str = "cpu",
                        attention: MLABackend | None = None) -> ForwardBatch:
    """Flatten the plan's sequences into one batch (positions continue from each cached context); the
    metadata prepares `attention` (default: the backend for `device`) for the step."""
    bs = plan.block_size
    ids, positions, slots, starts, rows = [], [], [], [0], []
    for tokens, ctx, table, sample in zip(plan.token_ids, plan.context_lens, plan.block_tables, plan.sample):
        n = len(tokens)
        ids.extend(tokens)
        span = range(ctx, ctx + n)
        positions.extend(span)
        slots.extend(table[p // bs] * bs + p % bs for p in span)
        starts.append(starts[-1] + n)
        if sample:
            rows.append(starts[-1] - 1)
    long = dict(dtype=torch.long, device=device)
    attn = AttentionMetadata(torch.tensor(slots, **long), starts, plan.context_lens, plan.block_tables, bs, attention)
    return ForwardBatch(torch.tensor(ids, **long), torch.tensor(positions, **long), attn, torch.tensor(rows, **long))


class ModelRunner:
    """Owns the model, its KV caches and the collection of its MoE statistics; `execute(plan)` is the
    same call on every rank of the group described by `info`.

    `dtype` is the latent cache's storage dtype (the activation dtype, or FP8: kernels/latent_cache.py);
    `attention` is the MLA backend every step's metadata prepares (default: the one for `device`).
    worker/runner_loader.py builds production runners with every device-dependent choice made once.

    A plan with `collect_moe_stats` times its MoE exchanges and, after the forward, drains every MoE
    layer's statistics and sums them over the group (an all-reduce every rank joins, so an empty plan
    can collect too).
    """

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", kv_caches: list[torch.Tensor] | None = None, info: ParallelInfo = ParallelInfo(),
                 attention: MLABackend | None = None):
        self.model = model
        self.block_size, self.dtype = block_size, dtype
        self.device = torch.device(device)
        self.attention = attention or select_attention_backend(self.device)
        self.moe_stats = MoEStatsCollector(model, info)
        self.kv_caches: list[torch.Tensor] = []
        if kv_caches is None:
            self.allocate_kv_cache(num_blocks)
        else:
            self.kv_caches, self.num_blocks = kv_caches, num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """(Re)allocate the latent cache with `num_blocks` blocks per layer (the old one is freed first)."""
        self.kv_caches = []
        self.kv_caches = allocate_kv_caches(self.model.config, num_blocks, self.block_size, self.dtype, self.device)
        self.num_blocks = num_blocks

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ForwardResult:
        """Run the plan's tokens through the model (an empty plan runs no forward but may collect)."""
        if plan.block_size != self.block_size:
            raise ValueError(f"plan block_size {plan.block_size} != cache block_size {self.block_size}")
        if plan.collect_moe_stats:
            self.moe_stats.time_next_step()
        logits = None if plan.is_empty else self._forward(plan)
        stats = self.moe_stats.collect(self.device) if plan.collect_moe_stats else None
        return ForwardResult(logits, stats)

    def heartbeat(self) -> None:
        """A no-op step that proves every rank can still step; one process has no peers to wait for
        (rank 0 of a group overrides it: worker/plan_channel.py)."""

    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        batch = build_forward_batch(plan, self.device, self.attention)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches)  # [T, hidden]
        if batch.sample_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden[batch.sample_rows]).float()  # [N, vocab]
