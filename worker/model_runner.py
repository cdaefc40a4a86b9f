"""ModelRunner: turns a StepPlan into one forward pass over the paged latent cache (runs on every rank).

StepPlan (plain lists) -> ForwardBatch (tensors + AttentionMetadata) -> logits of the sequences that
sample this step (the last token of a completed prefill chunk, or a decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2serve.kernels.attention_backend import MLABackend
from k2serve.kernels.backend import select_attention_backend
from k2serve.worker.config import EngineConfig
from k2serve.worker.model.attention_metadata import AttentionMetadata
from k2serve.worker.model.layers.moe_stats import MoEStatsSnapshot
from k2serve.worker.parallel import ParallelInfo, all_reduce
from k2serve.worker.scheduler import StepPlan


@dataclass
class ForwardBatch:
    """The tensors of one step: T new tokens of B sequences, N of which sample."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [N] int64: rows of the hidden states whose logits are needed


def kv_cache_block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers: layers * block_size * (kv_lora_rank + qk_rope_head_dim)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * block_size * config.kv_cache_dim * elem


def num_kv_blocks(engine: EngineConfig, model_config, dtype: torch.dtype) -> int:
    """Blocks of latent cache per rank: the configured number, else what kv_cache_memory_bytes holds."""
    if engine.num_kv_blocks:
        return engine.num_kv_blocks
    return max(1, engine.kv_cache_memory_bytes // kv_cache_block_bytes(model_config, engine.block_size, dtype))


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
    """Owns the model and its KV caches; `execute(plan)` is the same call on every rank.

    When a plan has `collect_moe_stats`, every rank drains its model's MoE stats after the forward and
    the expert token counts are summed over the group; `take_moe_stats()` hands the result to rank 0's
    engine. Token-shard padding rows (T not divisible by the world size) are routed too, so group
    counts may include up to world_size - 1 padding tokens per MoE layer per step.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", kv_caches: list[torch.Tensor] | None = None):
        self.model = model
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self.attention = select_attention_backend(self.device)  # chosen once, by device
        self.kv_caches = kv_caches if kv_caches is not None else self._allocate(num_blocks, block_size, dtype)
        self._moe_snapshot: MoEStatsSnapshot | None = None

    def _allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
        from k2serve.worker.model.deepseek_v3 import allocate_kv_caches

        caches = allocate_kv_caches(self.model.config, num_blocks, block_size, dtype)
        return [c.to(self.device) for c in caches]

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the plan's tokens through the model; [N, vocab] float32 logits of sampling rows (or None).

        An empty plan runs no forward (it may still collect MoE stats).
        """
        if plan.block_size != self.block_size:
            raise ValueError(f"plan block_size {plan.block_size} != cache block_size {self.block_size}")
        logits = None if plan.is_empty else self._forward(plan)
        if plan.collect_moe_stats:
            self._moe_snapshot = self._collect_moe_stats()
        return logits

    def heartbeat(self) -> None:
        """A no-op step that proves every rank can still step; one process has no peers to wait for
        (rank 0 of a group overrides it: worker/plan_channel.py)."""

    def take_moe_stats(self) -> MoEStatsSnapshot | None:
        """The group-summed MoE stats of the last collecting plan (once), or None."""
        snapshot, self._moe_snapshot = self._moe_snapshot, None
        return snapshot

    def _collect_moe_stats(self) -> MoEStatsSnapshot | None:
        """Drain this rank's MoE stats and sum the expert token counts over the group (a collective)."""
        stats = getattr(self.model, "moe_stats", None)
        if stats is None:
            return None
        snapshot = stats.drain()
        counts = snapshot.expert_tokens.to(self.device)  # [num_layers, n_routed_experts] int64
        all_reduce(counts, getattr(self.model, "info", ParallelInfo()))
        snapshot.expert_tokens = counts.cpu()
        return snapshot

    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        batch = build_forward_batch(plan, self.device, self.attention)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches)  # [T, hidden]
        if batch.sample_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden[batch.sample_rows]).float()  # [N, vocab]
