"""Paged MLA decode in plain torch (the CPU implementation): split-KV over block-aligned parts of the contexts.

The same absorbed attention as `kernels.mla_decode` (the Triton kernel), batched over every decoding
sequence with no Python loop per sequence. `plan_torch_decode` (once per step, on the host, from the
step's plain lists) cuts each context into parts of `split_tokens` tokens, a whole number of cache blocks;
the parts of all sequences are the work items. Each layer then reads its items' blocks with one
`index_select` on whole blocks, scores them with one batched matmul, and merges the parts of each
sequence by their log-sum-exp. Part sizes follow the step's context lengths, so padding stays below one
part per sequence instead of growing to the longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2serve.kernels.latent_cache import dequantize, gather_blocks

MAX_SPLIT_TOKENS = 1024
# A work item costs about as much as this many padded tokens (the merge and per-item bookkeeping).
ITEM_COST_TOKENS = 32


@dataclass(frozen=True)
class TorchDecodePlan:
    """Work items of one step's decodes: item i is part `item_part[i]` of sequence `item_seq[i]`."""

    num_seqs: int
    split_tokens: int  # tokens per part: a multiple of the cache block size
    item_seq: torch.Tensor  # [W] int64: the sequence of each item, items of one sequence adjacent
    item_blocks: torch.Tensor  # [W, split_tokens / block_size] int64: cache blocks (0 past the end)
    item_padding: torch.Tensor  # [W, split_tokens] bool: True where the part runs past its context
    is_one_part_each: bool  # every sequence is a single item: no merge


def choose_split_tokens(seq_lens: list[int], block_size: int) -> int:
    """The part size (power-of-two blocks, at most MAX_SPLIT_TOKENS) with the least padded work plus
    per-item cost; a part as long as the longest context (one item per sequence) is always a candidate."""
    longest = -(-max(seq_lens) // block_size) * block_size
    cap = max(block_size, MAX_SPLIT_TOKENS // block_size * block_size)
    candidates, size = [min(longest, cap)], block_size
    while size < candidates[0]:
        candidates.append(size)
        size *= 2
    return min(candidates, key=lambda s: sum(-(-n // s) for n in seq_lens) * (s + ITEM_COST_TOKENS))


def plan_torch_decode(seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                      device: torch.device | str) -> TorchDecodePlan:
    """Work items for contexts of `seq_lens` tokens (>= 1) stored in `block_tables`."""
    split = choose_split_tokens(seq_lens, block_size)
    blocks_per_item = split // block_size
    item_seq, item_blocks, item_lens = [], [], []
    for b, (n, table) in enumerate(zip(seq_lens, block_tables)):
        for start in range(0, n, split):
            first = start // block_size
            blocks = table[first: first + blocks_per_item]
            item_seq.append(b)
            item_blocks.append(blocks + [0] * (blocks_per_item - len(blocks)))
            item_lens.append(min(split, n - start))
    long = dict(dtype=torch.long, device=device)
    padding = torch.arange(split, device=device)[None, :] >= torch.tensor(item_lens, **long)[:, None]  # [W, P]
    return TorchDecodePlan(len(seq_lens), split, torch.tensor(item_seq, **long),
                           torch.tensor(item_blocks, **long).view(len(item_seq), blocks_per_item), padding,
                           len(item_seq) == len(seq_lens))


def mla_decode_torch(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: TorchDecodePlan,
                     sm_scale: float, kv_scale: float = 1.0) -> torch.Tensor:
    """q_latent [B, H, Dl], q_pe [B, H, Dr] over cache [N, block_size, Dl + Dr] -> [B, H, Dl] in q's dtype."""
    latent_dim, dtype = q_latent.shape[-1], q_latent.dtype
    q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, D]
    if not plan.is_one_part_each:
        q = q.index_select(0, plan.item_seq)  # [W, H, D]
    kv = gather_blocks(cache, plan.item_blocks.flatten())  # [W * P / bs, bs, D]
    kv = dequantize(kv, kv_scale, dtype).view(plan.item_blocks.shape[0], plan.split_tokens, -1)  # [W, P, D]
    scores = torch.bmm(q, kv.transpose(1, 2)).float().mul_(sm_scale)  # [W, H, P]
    scores.masked_fill_(plan.item_padding[:, None, :], float("-inf"))
    values = kv[..., :latent_dim]  # [W, P, Dl]
    if plan.is_one_part_each:
        return torch.bmm(scores.softmax(dim=-1).to(dtype), values)  # [B, H, Dl]
    part_max = scores.amax(dim=-1)  # [W, H]
    probs = scores.sub_(part_max[..., None]).exp_()
    part_sum = probs.sum(dim=-1)  # [W, H]
    part_out = torch.bmm(probs.to(dtype), values).float()  # [W, H, Dl]
    return merge_parts(part_out, part_max, part_sum, plan.item_seq, plan.num_seqs).to(dtype)


def merge_parts(part_out: torch.Tensor, part_max: torch.Tensor, part_sum: torch.Tensor, item_seq: torch.Tensor,
                num_seqs: int) -> torch.Tensor:
    """Combine unnormalised partial outputs [W, H, Dl] (with row maxima and sums [W, H]) per sequence."""
    seq_max = torch.full((num_seqs, part_max.shape[1]), float("-inf"), device=part_max.device)
    seq_max.scatter_reduce_(0, item_seq[:, None].expand_as(part_max), part_max, "amax")  # [B, H]
    weight = torch.exp(part_max - seq_max.index_select(0, item_seq))  # [W, H]
    total = torch.zeros_like(seq_max).index_add_(0, item_seq, part_sum * weight)  # [B, H]
    out = torch.zeros(num_seqs, *part_out.shape[1:], device=part_out.device)
    out.index_add_(0, item_seq, part_out * weight[..., None])  # [B, H, Dl]
    return out / total[..., None]
