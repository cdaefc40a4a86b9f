"""AttentionMetadata: where each sequence of a flattened batch lives in the paged MLA latent cache.

The model runner builds one per step; every attention layer reads it. The cache of one layer is a
tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] holding `[latent | k_rope]` per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from k2serve.kernels.attention_backend import MLABackend
from k2serve.kernels.backend import select_attention_backend
from k2serve.kernels.latent_cache import FP8_KV_SCALE
from k2serve.kernels.mla_prefill_batch import PrefillPlan, plan_prefill


@dataclass
class AttentionMetadata:
    """Per-step layout of a variable-length batch of B sequences and T new tokens, and how to attend over it.

    A sequence with one new token decodes (absorbed attention over the latent cache); one with more
    prefills a chunk (expanded attention). Both are prepared here once per step, from the plain lists on
    the host, and shared by all layers: `decode_rows` and the `backend`'s `decode_plan`, and `prefill_plan`.
    `backend` is the attention implementation the model runner chose for its device (by default the one
    for slot_mapping's device); `kv_scale` is the per-tensor scale of an FP8 cache.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    query_start_loc: list[int]  # [B + 1]: offsets of each sequence's new tokens in the flat batch
    context_lens: list[int]  # [B]: tokens of each sequence already in the cache before this step
    block_tables: list[list[int]]  # [B][n_blocks]: physical block ids of each sequence, in order
    block_size: int
    backend: MLABackend | None = None
    kv_scale: float = FP8_KV_SCALE
    decode_rows: torch.Tensor | None = field(init=False, default=None)  # [B_decode] int64 token rows
    decode_plan: object = field(init=False, default=None)
    prefill_plan: PrefillPlan | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        device = self.slot_mapping.device
        if self.backend is None:
            self.backend = select_attention_backend(device)
        decodes = [i for i in range(self.num_seqs) if self.query_len(i) == 1]
        if decodes:
            starts = [self.query_start_loc[i] for i in decodes]
            self.decode_rows = torch.tensor(starts, dtype=torch.long, device=device)
            self.decode_plan = self.backend.plan_decode(
                [self.seq_len(i) for i in decodes], [self.block_tables[i] for i in decodes], self.block_size, device)
        prefills = [(self.query_start_loc[i], self.query_start_loc[i + 1], self.context_lens[i], self.block_tables[i])
                    for i in range(self.num_seqs) if self.query_len(i) > 1]
        if prefills:
            self.prefill_plan = plan_prefill(prefills, self.block_size, device)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    def seq_len(self, i: int) -> int:
        """Total tokens of sequence i after this step (cached context + new tokens)."""
        return self.context_lens[i] + self.query_len(i)

    def cache_slots(self, i: int) -> torch.Tensor:
        """[seq_len(i)] flat cache slots holding sequence i's whole context, new tokens included."""
        device = self.slot_mapping.device
        table = torch.tensor(self.block_tables[i], dtype=torch.long, device=device)
        pos = torch.arange(self.seq_len(i), device=device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @classmethod
    def contiguous(cls, seq_lens: list[int], context_lens: list[int], block_size: int = 16,
                   device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for sequences laid out in consecutive blocks (offline runs and tests)."""
        block_tables, slots, starts, next_block = [], [], [0], 0
        for n_new, n_ctx in zip(seq_lens, context_lens):
            total = n_ctx + n_new
            n_blocks = -(-total // block_size)
            table = list(range(next_block, next_block + n_blocks))
            next_block += n_blocks
            block_tables.append(table)
            for pos in range(n_ctx, total):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            starts.append(starts[-1] + n_new)
        return cls(torch.tensor(slots, dtype=torch.long, device=device), starts, list(context_lens), block_tables,
                   block_size)
