"""Vocab-parallel embedding and lm_head: each rank holds vocab / W rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.worker.model.layers.linear import new_weight, shard_parameter
from k2serve.worker.parallel import ParallelInfo, all_reduce, gather_last_dim


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, info: ParallelInfo, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.info = info
        self.n_local_vocab = info.split(vocab_size, "vocab_size")
        self.vocab_start = info.rank * self.n_local_vocab
        self.weight = shard_parameter(new_weight(self.n_local_vocab, dim, dtype), 0, info)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.info.is_single:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.n_local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, dim]
        out = out.masked_fill(outside[:, None], 0.0)
        return all_reduce(out, self.info)


class ParallelLMHead(nn.Module):
    """Untied lm_head split by vocab; every rank receives the gathered [N, vocab] float32 logits."""

    def __init__(self, vocab_size: int, dim: int, info: ParallelInfo, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.info = info
        self.weight = shard_parameter(new_weight(info.split(vocab_size, "vocab_size"), dim, dtype), 0, info)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()  # [N, vocab / W]
        return gather_last_dim(logits, self.info)
