"""AttentionMetadata: where each sequence of a flattened batch lives in the paged MLA latent cache.

The model runner builds one per step; every attention layer reads it. The cache of one layer is a
tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] holding `[latent | k_rope]` per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of a variable-length batch of B sequences and T new tokens.

    `padded_slots` (every sequence's whole-context cache slots, right-padded) is computed once per
    step, in one vectorized op, and shared by all layers.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    query_start_loc: list[int]  # [B + 1]: offsets of each sequence's new tokens in the flat batch
    context_lens: list[int]  # [B]: tokens of each sequence already in the cache before this step
    block_tables: list[list[int]]  # [B][n_blocks]: physical block ids of each sequence, in order
    block_size: int
    padded_slots: torch.Tensor | None = None  # [B, max seq_len] int64, right-padded with slot 0

    def __post_init__(self) -> None:
        if self.padded_slots is None:
            seq_lens = [self.seq_len(i) for i in range(self.num_seqs)]
            self.padded_slots = padded_cache_slots(self.block_tables, seq_lens, self.block_size,
                                                   self.slot_mapping.device)

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
        return self.padded_slots[i, : self.seq_len(i)]

    @classmethod
    def contiguous(cls, seq_lens: list[int], context_lens: list[int], block_size: int = 16) -> "AttentionMetadata":
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
        return cls(torch.tensor(slots, dtype=torch.long), starts, list(context_lens), block_tables, block_size)


def padded_cache_slots(block_tables: list[list[int]], seq_lens: list[int], block_size: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, max(seq_lens)] flat cache slots of every sequence's context, right-padded with slot 0."""
    max_len = max(seq_lens, default=0)
    width = -(-max_len // block_size)
    tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables],
                          dtype=torch.long, device=device).view(len(block_tables), width)  # [B, width]
    pos = torch.arange(max_len, device=device)  # [S]
    return tables[:, pos // block_size] * block_size + pos % block_size  # [B, S]
